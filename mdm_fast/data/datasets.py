"""Map-style datasets of the trainer. Every item is a dict with ``image`` (uint8 (H, W, 3) at the top
resolution) and, where the source has them, ``caption`` (str), ``label`` (int), ``text_embedding``
((T, D) float32). Items are addressed as ``(index, seed)`` so that random crops do not depend on the
worker that reads them. A sample that cannot be decoded is skipped (the next one is read instead) and
counted in ``_skipped``; it never stops training.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from mdm_fast.data.images import CorruptImage, decode_image, resize_crop, tile_frames
from mdm_fast.data.reader_config import ReaderConfig

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".gif")
MAX_SKIPS = 64


class LongCaption(ValueError):
    """A caption over ``reader_config.max_caption_length`` characters or ``max_token_length`` tokens: the
    public reader drops such samples."""


class SampleDataset(Dataset):
    """Base: subclasses implement ``__len__`` and ``load(index, rng) -> dict`` (CorruptImage on bad data).
    ``tokenize`` (the text encoder's ``caption_tokenizer()``, set by the trainer) gives each caption its
    token ids (``caption_ids``, which the encoder then only pads) and drops captions over
    ``max_token_length`` tokens; without it they are left to the encoder, which cuts them. ``check`` (the
    encoder's ``sample_check()``, set by the trainer) skips a sample without what the model is
    conditioned on (a row's empty label cell, a label out of range, an embedding of another width)."""

    def __init__(self, reader: ReaderConfig):
        self.reader = reader
        self.tokenize: Optional[Callable[[str], List[int]]] = None
        self.check: Optional[Callable[[Dict[str, Any]], None]] = None  # the encoder's SampleCheck
        if reader.smaller_side_size > 0 and reader.smaller_side_size != reader.image_size:
            log.warning("reader_config.smaller_side_size %d is not used, as in the public reader: the smaller "
                        "side is resized to image_size %d", reader.smaller_side_size, reader.image_size)

    def load(self, index: int, rng: np.random.Generator) -> Dict[str, Any]:
        raise NotImplementedError

    def image(self, data, rng) -> np.ndarray:
        r = self.reader
        return resize_crop(decode_image(data), r.image_size, r.random_crop, rng)

    def caption(self, text: str) -> str:
        limit = self.reader.max_caption_length
        size = len(text.encode("utf-8")) + 2  # as the public reader counts: bytes, with a space on each side
        if 0 <= limit < size:
            raise LongCaption(f"a caption of {size} bytes with its two spaces, over max_caption_length {limit}")
        return text

    def _tokenized(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        """``sample`` with its caption's ``caption_ids`` (LongCaption over ``max_token_length`` tokens)."""
        if self.tokenize is None or "caption" not in sample:
            return sample
        ids = self.tokenize(sample["caption"])
        limit = self.reader.max_token_length
        if 0 < limit < len(ids):
            raise LongCaption(f"a caption of {len(ids)} tokens, over max_token_length {limit}")
        sample["caption_ids"] = ids
        return sample

    def __getitem__(self, item) -> Dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        rng = np.random.default_rng(seed)
        last = "?"
        for skipped in range(MAX_SKIPS):
            i = (index + skipped) % len(self)
            try:
                sample = self._tokenized(self.load(i, rng))
                if self.check is not None:
                    self.check(sample)
            except LongCaption as e:  # dropped, as the public reader does (counted, not logged one by one)
                log.debug("skipping sample %d of %s: %s", i, type(self).__name__, e)
                last = str(e)
                continue
            except (CorruptImage, OSError, KeyError, ValueError, EOFError) as e:  # EOFError: an empty .npy
                log.warning("skipping sample %d of %s: %s", i, type(self).__name__, e)
                last = str(e)
                continue
            sample["_skipped"] = skipped
            return sample
        raise ValueError(f"{type(self).__name__}: {MAX_SKIPS} consecutive samples from index {index} are "
                         f"unusable (the last: {last}); check the dataset and the config")


class ArrayDataset(SampleDataset):
    """Class-labelled image arrays: uint8 (N, H, W[, C]) or float in [0, 1], labels (N,)."""

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray], reader: ReaderConfig,
                 captions: Optional[Sequence[str]] = None):
        super().__init__(reader)
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"image array: expected (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise ValueError(f"image array: expected uint8, or float in [0, 1], got {images.dtype} (convert "
                                 "other integer images to uint8 yourself: their range is not known here)")
            images = np.clip(np.asarray(images, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"labels: expected {len(images)} labels, got {len(labels)}")
        self.images, self.labels, self.captions = images, labels, captions

    def __len__(self):
        return len(self.images)

    def load(self, index, rng):
        from PIL import Image

        img = self.images[index]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        r = self.reader
        out: Dict[str, Any] = {"image": resize_crop(pil, r.image_size, r.random_crop, rng)}
        if self.labels is not None:
            out["label"] = int(self.labels[index])
        if self.captions is not None:
            out["caption"] = self.caption(self.captions[index])
        return out


def sklearn_digits(reader: ReaderConfig) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped with the package), labels 0-9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    captions = [f"a handwritten digit {int(t)}" for t in d.target]
    return ArrayDataset(images, d.target.astype(np.int64), reader, captions)


def read_table(path: Path) -> List[Dict[str, str]]:
    """The rows of a .jsonl, .tsv or .csv table: UTF-8 (a byte-order mark, as spreadsheets write, is
    dropped); '"' quotes a field, as the public reader and writer do."""
    if _suffix(path) == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter=table_delimiter(path), quotechar='"'))
    odd = [i for i, r in enumerate(rows, 2)
           if None in r or None in r.values() or any("\n" in v for v in r.values() if isinstance(v, str))]
    if odd:
        log.warning("%s: %d row(s), the first on line %d, have more or fewer fields than the header or span "
                    "lines: a '\"' in a field starts a quoted one (quote such a field whole, its quotes doubled, "
                    "as the public writer does)", path, len(odd), odd[0])
    return rows


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def table_delimiter(path: Path) -> str:
    """The public index files are tab-separated (.tsv); a .csv is comma-separated."""
    return "," if _suffix(path) == ".csv" else "\t"


def _resolve(path: str, base: Path) -> Path:
    """A path from an index file: as written (relative to the working directory, as the public
    reader does), else relative to the index file's folder, else its basename there."""
    p = Path(path)
    for cand in (p, base / p, base / p.name):
        if cand.exists():
            return cand
    return p


class CaptionFolder(SampleDataset):
    """Images listed in a tsv or jsonl table with a file column (file/image/filename/path) and
    ``caption`` and/or ``label``; optional ``text_embedding`` (a .npy path per row)."""

    FILE_KEYS = ("file", "image", "filename", "path", "file_name")

    def __init__(self, table: Path, reader: ReaderConfig):
        super().__init__(reader)
        self.base = table.parent
        rows = read_table(table)
        if not rows:
            raise ValueError(f"{table}: no rows")
        key = next((k for k in self.FILE_KEYS if k in rows[0]), None)
        if key is None:
            raise ValueError(f"{table}: expected a file column named one of {self.FILE_KEYS}, got {list(rows[0])}")
        self.rows = [(r[key], r) for r in rows]

    def __len__(self):
        return len(self.rows)

    def load(self, index, rng):
        name, row = self.rows[index]
        out: Dict[str, Any] = {"image": self.image(str(_resolve(name, self.base)), rng)}
        _copy_annotations(row, out, self)
        return out


def _copy_annotations(row: Dict[str, Any], out: Dict[str, Any], ds: "CaptionFolder") -> None:
    """caption / label / text_embedding (a .npy path relative to the table) of one table row."""
    if row.get("caption") is not None:
        out["caption"] = ds.caption(str(row["caption"]))
    if row.get("label") not in (None, ""):
        out["label"] = int(row["label"])
    emb = row.get("text_embedding")
    if emb:
        out["text_embedding"] = np.load(_resolve(emb, ds.base))


class _TarReader:
    """Open tar files and their member tables, one set per worker process."""

    def __init__(self):
        self.pid, self.files = None, {}

    def read(self, tar_path: Path, member: str) -> bytes:
        if self.pid != os.getpid():  # after a fork: never share file handles
            self.pid, self.files = os.getpid(), {}
        entry = self.files.get(tar_path)
        if entry is None:
            tf = tarfile.open(tar_path)
            entry = self.files[tar_path] = (tf, {m.name: m for m in tf.getmembers()})
        tf, members = entry
        info = members.get(member) or members.get("./" + member)
        if info is None:
            raise KeyError(f"{member} not in {tar_path}")
        return tf.extractfile(info).read()


class TarIndexDataset(SampleDataset):
    """The public format: index tsvs with columns ``tar``, ``file``, ``caption`` (and optionally
    ``text_tar``/``text_file`` for precomputed embeddings), listed by a file list with a
    ``filename`` column."""

    def __init__(self, index_files: Sequence[Path], reader: ReaderConfig):
        super().__init__(reader)
        self.rows: List[Tuple[Path, Dict[str, str]]] = []
        for index in index_files:
            for row in read_table(index):
                if "tar" not in row or "file" not in row:
                    raise ValueError(f"{index}: expected columns tar, file, caption; got {list(row)}")
                self.rows.append((index.parent, row))
        if not self.rows:
            raise ValueError(f"no samples in index files {list(map(str, index_files))}")
        self.tars = _TarReader()

    def __len__(self):
        return len(self.rows)

    def load(self, index, rng):
        base, row = self.rows[index]
        out: Dict[str, Any] = {"image": self.image(self.tars.read(_resolve(row["tar"], base), row["file"]), rng)}
        if row.get("caption") is not None:
            out["caption"] = self.caption(row["caption"])
        if row.get("text_tar") and row.get("text_file"):
            data = self.tars.read(_resolve(row["text_tar"], base), row["text_file"])
            out["text_embedding"] = np.load(io.BytesIO(data))
        return out


class WebDataset(SampleDataset):
    """webdataset-style tars: members ``KEY.jpg|png|...`` with ``KEY.txt`` / ``KEY.caption``,
    ``KEY.cls`` (label), ``KEY.json`` (``caption``/``label`` fields), ``KEY.npy`` (text embedding)."""

    def __init__(self, tars: Sequence[Path], reader: ReaderConfig):
        super().__init__(reader)
        self.samples: List[Tuple[Path, Dict[str, str]]] = []
        for tar in tars:
            groups: Dict[str, Dict[str, str]] = {}
            with tarfile.open(tar) as tf:
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    key, dot, ext = base.partition(".")
                    groups.setdefault(os.path.join(d, key), {})["." + ext.lower()] = m.name
            self.samples += [(tar, g) for _, g in sorted(groups.items()) if any(e in g for e in IMAGE_EXTS)]
        if not self.samples:
            raise ValueError(f"no image samples in webdataset tars {list(map(str, tars))}")
        self.tars = _TarReader()

    def __len__(self):
        return len(self.samples)

    def load(self, index, rng):
        tar, g = self.samples[index]
        img_member = next(g[e] for e in IMAGE_EXTS if e in g)
        out: Dict[str, Any] = {"image": self.image(self.tars.read(tar, img_member), rng)}
        for ext in (".txt", ".caption"):
            if ext in g:
                out["caption"] = self.caption(self.tars.read(tar, g[ext]).decode("utf-8").strip())
        if ".cls" in g:
            out["label"] = int(self.tars.read(tar, g[".cls"]).decode().strip())
        if ".json" in g:
            meta = json.loads(self.tars.read(tar, g[".json"]))
            if "caption" in meta and "caption" not in out:
                out["caption"] = self.caption(str(meta["caption"]))
            if "label" in meta and "label" not in out:
                out["label"] = int(meta["label"])
        if ".npy" in g:
            out["text_embedding"] = np.load(io.BytesIO(self.tars.read(tar, g[".npy"])))
        return out


def expand_braces(pattern: str) -> List[str]:
    """``shard-{000..003}.tar`` -> four names; globs are expanded too."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [n for i in range(lo, hi + 1)
                for n in expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]
    return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]


def _natural_key(path: Path) -> List[Any]:
    """Sort key: the name's digit runs as numbers (frame 2 before frame 10, as ffmpeg's %d names them)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def _video_frames(path: Path, num_frames: int) -> List[np.ndarray]:
    """``num_frames`` frames sampled evenly from a folder of frame images or a video file: uint8 (H, W, 3) each."""
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=_natural_key)
        if not files:
            raise CorruptImage(f"{path}: no frame images")
        pick = np.linspace(0, len(files) - 1, num_frames).round().astype(int)
        return [np.asarray(decode_image(str(files[i]))) for i in pick]  # each resized on its own: any sizes
    import av  # VideoClips checked that it is there

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:
        raise CorruptImage(f"{path}: {e}") from e
    if not frames:
        raise CorruptImage(f"{path}: no frames")
    pick = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i] for i in pick]


class VideoClips(SampleDataset):
    """Clips (sub-folders of frames, or video files) tiled n x n into one image of the top resolution:
    ``num_frames`` = n*n frames, each resized/cropped to ``image_size // n``, frame ``i*n + j`` at grid
    cell (i, j), as the temporal mode expects. Captions/labels from ``captions.tsv``/``.jsonl`` in the
    folder (file column = clip name), if present."""

    def __init__(self, root: Path, reader: ReaderConfig, num_frames: int = 16):
        super().__init__(reader)
        n = int(round(num_frames ** 0.5))
        if n * n != num_frames:
            raise ValueError(f"video: num_frames must be a square (4, 16, 64), got {num_frames}")
        if reader.image_size > 0 and reader.image_size % n:
            raise ValueError(f"video: image_size {reader.image_size} must be divisible by the grid side {n}")
        self.num_frames, self.n = num_frames, n
        clips = sorted(p for p in root.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_EXTS)
        if not clips:
            raise ValueError(f"{root}: no clips (sub-folders of frames or video files)")
        if any(not c.is_dir() for c in clips):
            try:
                import av  # noqa: F401
            except ImportError:
                raise ValueError(f"{root}: decoding video files needs the `av` package (pip install av); or "
                                 "extract the frames into a folder per clip") from None
        annotations: Dict[str, Dict[str, Any]] = {}
        for name in ("captions.tsv", "captions.jsonl"):
            if (root / name).is_file():
                for row in read_table(root / name):
                    key = next((row[k] for k in CaptionFolder.FILE_KEYS if k in row), None)
                    annotations[str(key)] = row
        self.clips = [(c, annotations.get(c.name, {})) for c in clips]
        self.base = root

    def __len__(self):
        return len(self.clips)

    def load(self, index, rng):
        from PIL import Image

        clip, row = self.clips[index]
        frames = _video_frames(clip, self.num_frames)
        r = self.reader
        size = r.image_size // self.n if r.image_size > 0 else -1
        crop_seed = int(rng.integers(1 << 31))  # the same crop for every frame of the clip
        tiles = [resize_crop(Image.fromarray(f), size, r.random_crop, np.random.default_rng(crop_seed))
                 for f in frames]
        out: Dict[str, Any] = {"image": tile_frames(np.stack(tiles))}
        _copy_annotations(row, out, self)
        return out


def build_dataset(spec: str, reader: ReaderConfig, video_frames: int = 0) -> SampleDataset:
    """The dataset named by ``file_list``:

    - ``sklearn:digits``: scikit-learn's 8x8 digits with labels;
    - ``X.npz`` with arrays ``images`` and ``labels``;
    - a public file list (tsv, column ``filename``) of index tsvs, or one index tsv (columns tar, file, caption);
    - a caption table ``X.tsv`` / ``X.jsonl`` (file column + caption/label), or a folder holding
      ``captions.tsv`` / ``captions.jsonl``;
    - webdataset tars: ``X.tar``, a glob or ``shard-{000..009}.tar``;
    - with ``video_frames`` > 0: a folder of clips.
    """
    if not spec:
        raise ValueError("file_list: no training data given (see mdm_fast.data.build_dataset for the forms)")
    if spec == "sklearn:digits":
        return sklearn_digits(reader)
    path = Path(spec)
    if video_frames > 0:
        if not path.is_dir():
            raise ValueError(f"video data: expected a folder of clips, got {spec!r}")
        return VideoClips(path, reader, video_frames)
    if _suffix(path) == ".npz":
        if not path.is_file():
            raise ValueError(f"file_list: no file {spec}")
        arrays = np.load(path)
        if "images" not in arrays:
            raise ValueError(f"{spec}: expected arrays 'images' (and 'labels'), got {list(arrays)}")
        return ArrayDataset(arrays["images"], arrays["labels"] if "labels" in arrays else None, reader)
    if path.is_dir():
        for name in ("captions.tsv", "captions.jsonl", "metadata.jsonl"):
            if (path / name).is_file():
                return CaptionFolder(path / name, reader)
        raise ValueError(f"{spec}: a data folder needs captions.tsv or captions.jsonl (file + caption/label)")
    if _suffix(path) in (".tsv", ".csv", ".jsonl"):
        if not path.is_file():
            raise ValueError(f"file_list: no file {spec}")
        if _suffix(path) == ".jsonl":
            return CaptionFolder(path, reader)
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline().rstrip("\r\n").split(table_delimiter(path))
        if header == ["filename"]:
            indexes = [_resolve(r["filename"], path.parent) for r in read_table(path)]
            missing = [str(p) for p in indexes if not p.is_file()]
            if missing:
                raise ValueError(f"{spec}: {len(missing)} index file(s) it lists do not exist, e.g. {missing[0]!r} "
                                 f"(looked for as written, and in {path.parent})")
            return TarIndexDataset(indexes, reader)
        if "tar" in header and "file" in header:
            return TarIndexDataset([path], reader)
        return CaptionFolder(path, reader)
    tars = [Path(p) for p in expand_braces(spec)]
    if tars and all(_suffix(p) == ".tar" and p.is_file() for p in tars):
        return WebDataset(tars, reader)
    raise ValueError(f"file_list {spec!r}: not a known dataset form (sklearn:digits, .npz, .tsv/.jsonl table, "
                     "public file list or index tsv, a folder with captions.tsv, webdataset .tar shards)")
