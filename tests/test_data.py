"""Datasets and loading: every source form, corrupt images skipped and counted, video tiling,
deterministic resumable sharding."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mdm_fast.data import (ArrayDataset, ReaderConfig, ShardedSampler, build_dataset, collate, make_loader, resize_crop,
                           tile_frames, to_model_range)
from mdm_fast.data.datasets import expand_braces
from mdm_fast.data.images import decode_image

R = ReaderConfig(image_size=16, num_readers=0)


def _png(color, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _folder(tmp_path, table="tsv", corrupt=()):
    for i in range(5):
        data = b"not an image" if i in corrupt else _png((40 * i, 10, 200))
        (tmp_path / f"img{i}.png").write_bytes(data)
    if table == "tsv":
        rows = ["file\tcaption\tlabel"] + [f"img{i}.png\tcaption {i}\t{i}" for i in range(5)]
        (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    else:  # captions.jsonl, or a Hugging Face imagefolder's metadata.jsonl (file_name); blank lines are skipped
        name, key = ("captions.jsonl", "file") if table == "jsonl" else ("metadata.jsonl", "file_name")
        with open(tmp_path / name, "w") as f:
            for i in range(5):
                f.write(json.dumps({key: f"img{i}.png", "caption": f"caption {i}", "label": i}) + "\n\n")
    return tmp_path


@pytest.mark.parametrize("table", ["tsv", "jsonl", "metadata"])
def test_caption_folder(tmp_path, table):
    ds = build_dataset(str(_folder(tmp_path, table)), R)
    s = ds[(2, 0)]
    assert s["image"].shape == (16, 16, 3) and s["image"].dtype == np.uint8
    assert s["caption"] == "caption 2" and s["label"] == 2 and s["_skipped"] == 0
    assert tuple(s["image"][8, 8]) == (80, 10, 200)


def test_a_csv_table_is_comma_separated(tmp_path):
    _folder(tmp_path)
    rows = ["file,caption,label"] + [f'img{i}.png,"caption, {i}",{i}' for i in range(5)]
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    s = build_dataset(str(tmp_path / "index.csv"), R)[(3, 0)]
    assert s["caption"] == "caption, 3" and s["label"] == 3


def test_table_cells_and_paths_read_as_written(tmp_path, monkeypatch):
    """An empty caption is a caption (""), an empty label no label, a label that is not a number skips
    the sample (counted); a file path is read as written (from the working directory, as the public
    reader reads it), then relative to the table, and only then by its basename there."""
    _folder(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img0.png").write_bytes(_png((1, 2, 3)))  # not tmp_path/img0.png, of colour (0, 10, 200)
    rows = ["file\tcaption\tlabel", "sub/img0.png\t\t", "img1.png\tone\tn/a", "img2.png\ttwo\t2"]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(str(tmp_path / "t.tsv"), R)
    s = ds[(0, 0)]
    assert s["caption"] == "" and "label" not in s and s["_skipped"] == 0 and tuple(s["image"][8, 8]) == (1, 2, 3)
    s = ds[(1, 0)]
    assert s["caption"] == "two" and s["label"] == 2 and s["_skipped"] == 1
    cwd = tmp_path / "cwd"  # a working directory holding sub/img0.png too: read before the table's own
    (cwd / "sub").mkdir(parents=True)
    (cwd / "sub" / "img0.png").write_bytes(_png((4, 5, 6)))
    monkeypatch.chdir(cwd)
    assert tuple(build_dataset(str(tmp_path / "t.tsv"), R)[(0, 0)]["image"][8, 8]) == (4, 5, 6)


def test_samples_with_captions_over_max_caption_length_are_dropped(tmp_path):
    """As the public reader's filter: the sample is skipped (and counted), not its caption cut."""
    folder = _folder(tmp_path)
    rows = ["file\tcaption\tlabel"] + [f"img{i}.png\t{'long caption ' * i}{i}\t{i}" for i in range(5)]
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(str(folder), ReaderConfig(image_size=16, max_caption_length=20))
    s = ds[(2, 0)]  # 'long caption long caption 2' (27 characters): the next short one instead
    assert s["label"] == 0 and s["_skipped"] == 3 and s["caption"] == "0"
    assert ds[(1, 0)]["caption"] == "long caption 1"  # 14 characters: kept whole


def test_max_caption_length_counts_bytes_and_the_two_spaces_of_the_public_reader(tmp_path):
    """The public reader pads a caption with a space on each side, then drops it over max_caption_length
    bytes: 8 ASCII characters fit 10, 9 do not, nor do 9 characters of 10 UTF-8 bytes."""
    folder = _folder(tmp_path)
    captions = ["12345678", "123456789", "caf\u00e9 1234", "ok", "ok"]
    rows = ["file\tcaption\tlabel"] + [f"img{i}.png\t{c}\t{i}" for i, c in enumerate(captions)]
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = build_dataset(str(folder), ReaderConfig(image_size=16, max_caption_length=10))
    assert [ds[(i, 0)]["label"] for i in range(3)] == [0, 3, 3]
    with pytest.raises(ValueError, match=r"consecutive samples from index 3 are unusable \(the last: "):  # 0 keeps
        # no caption (each has its two spaces)
        build_dataset(str(folder), ReaderConfig(image_size=16, max_caption_length=0))[(3, 0)]


def test_samples_with_captions_over_max_token_length_are_dropped(tmp_path):
    """With the text encoder's tokenizer (words stand in), through a loader worker (the tokenizer travels
    to it): the public reader drops such samples; without a tokenizer they are kept. The batch carries
    the ids of its captions."""
    folder = _folder(tmp_path)
    rows = ["file\tcaption\tlabel"] + [f"img{i}.png\t{'word ' * (2 * i)}end\t{i}" for i in range(5)]
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n")
    reader = ReaderConfig(image_size=16, max_token_length=3)
    ds = build_dataset(str(folder), reader)
    assert ds[(3, 0)]["label"] == 3  # 7 words, no token count: kept (the encoder cuts it)
    ds.tokenize = _words
    s = ds[(2, 0)]  # 5 words: over 3, and so are 3 and 4; the next one is 0 (1 word)
    assert s["label"] == 0 and s["_skipped"] == 3
    assert ds[(1, 0)]["label"] == 1  # 3 words: at the limit, kept
    batch = next(iter(make_loader(ds, batch_size=5, num_steps=1, seed=0, num_workers=1)))
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 0, 1] and batch["_skipped"] == 3 + 2 + 1
    assert [_words(c) for c in batch["caption"]] == batch["caption_ids"]
    reader.max_token_length = -1
    assert ds[(4, 0)]["label"] == 4  # no limit


def _words(text: str) -> list:
    return text.split()


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    ds = build_dataset(str(_folder(tmp_path, corrupt=(1, 3))), R)
    loader = make_loader(ds, batch_size=5, num_steps=1, seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 16, 16, 3)  # the batch is still full
    assert batch["_skipped"] == 2
    assert 1 not in batch["label"].tolist() and 3 not in batch["label"].tolist()


def test_a_sample_without_what_the_model_needs_is_skipped_and_counted(tmp_path, caplog):
    """The encoder's sample_check (set by the trainer; picklable for the workers): an empty label cell, a
    label out of range, a missing caption, an embedding of another width or an empty .npy skip the sample
    as a corrupt image is skipped; they failed the whole batch, at the same step after every resume."""
    import pickle

    from mdm_fast.text import ClassLabelEncoder, PrecomputedEncoder
    from mdm_fast.text.encoders import SampleCheck

    _folder(tmp_path)
    rows = ["file\tcaption\tlabel", "img0.png\ta\t", "img1.png\tb\t12", "img2.png\tc\t8", "img3.png\td\t-1",
            "img2.png\tc\t2", "img3.png"]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(str(tmp_path / "t.tsv"), R)
    ds.check = pickle.loads(pickle.dumps(ClassLabelEncoder(8).sample_check()))
    s = ds[(0, 0)]
    assert s["label"] == 2 and s["_skipped"] == 4 and "label 12: expected one in [0, 8)" in caplog.text
    assert "label 8: expected" in caplog.text and "label -1: expected" in caplog.text  # both bounds
    ds.check = SampleCheck("caption")
    assert ds[(5, 0)]["_skipped"] == 1 and "no 'caption'" in caplog.text  # a short row: no caption field
    embeddings = {"e0": (3, 5), "e2": (2, 6), "e3": (1, 4, 6), "e4": (2, 3, 6)}  # e3: one caption's, batched
    for name, shape in embeddings.items():
        np.save(tmp_path / f"{name}.npy", np.ones(shape, np.float32))
    (tmp_path / "e1.npy").write_bytes(b"")
    rows = ["file\ttext_embedding"] + [f"img{i % 4}.png\te{i}.npy" for i in range(5)]
    (tmp_path / "e.tsv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(str(tmp_path / "e.tsv"), R)
    ds.check = PrecomputedEncoder(6).sample_check()
    s = ds[(0, 0)]
    assert s["text_embedding"].shape == (2, 6) and s["_skipped"] == 2
    assert "text_embedding of shape (3, 5): expected (tokens, 6)" in caplog.text
    assert ds[(3, 0)]["_skipped"] == 0  # (1, T, D), which collate takes
    assert ds[(4, 0)]["_skipped"] == 3 and "text_embedding of shape (2, 3, 6)" in caplog.text  # e4, e0, e1


def test_tables_with_a_byte_order_mark_stray_quotes_or_upper_case_suffixes(tmp_path, caplog):
    """A spreadsheet's UTF-8 table (a byte-order mark) reads as written; a '"' that makes rows merge or
    fields go missing is warned about, with the line; .TSV is a .tsv."""
    _folder(tmp_path)
    rows = ["file\tcaption", "img0.png\tcafé", "img1.png\t\"Stop\" sign", "img2.png\t\"open", "img3.png\tx"]
    (tmp_path / "bom.TSV").write_text("\ufeff" + "\n".join(rows[:2]) + "\n", encoding="utf-8")
    ds = build_dataset(str(tmp_path / "bom.TSV"), R)
    assert len(ds) == 1 and ds[(0, 0)]["caption"] == "café" and "fields" not in caplog.text
    (tmp_path / "q.tsv").write_text("\n".join(rows) + "\n")
    assert len(build_dataset(str(tmp_path / "q.tsv"), R)) == 3  # the quote swallowed the last row
    assert "1 row(s), the first on line 4, have more or fewer fields than the header or span lines" in caplog.text
    (tmp_path / "b.jsonl").write_text("\ufeff" + json.dumps({"file": "img0.png", "caption": "x"}) + "\n")
    assert build_dataset(str(tmp_path / "b.jsonl"), R)[(0, 0)]["caption"] == "x"


def test_everything_corrupt_is_a_clear_error(tmp_path):
    """A data set whose samples all fail is one ValueError (the CLI's one error line) naming the last reason."""
    ds = build_dataset(str(_folder(tmp_path, corrupt=range(5))), R)
    with pytest.raises(ValueError, match=r"64 consecutive samples from index 0 are unusable \(the last: .*img"):
        ds[(0, 0)]


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _public_shard(tmp_path):
    """Three samples; image 2 is stored as ./0000000002.png (a tar of '.'), samples 1 and 2 have a text
    embedding (2, 4) of their index in the text tar."""
    with tarfile.open(tmp_path / "images_00000.tar", "w") as tf, tarfile.open(tmp_path / "text_00000.tar", "w") as tt:
        for i in range(3):
            _add(tf, f"{'./' * (i == 2)}{i:010d}.png", _png((10 * i, 20, 30)))
            _add(tt, f"{i:010d}.npy", _npy(np.full((2, 4), i, np.float32)))
    rows = ["tar\tfile\tcaption\ttext_tar\ttext_file"] + [
        f"shards/images_00000.tar\t{i:010d}.png\tpicture {i}\ttext_00000.tar\t{f'{i:010d}.npy' * (i > 0)}"
        for i in range(3)]
    (tmp_path / "images_00000.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "training_0.tsv").write_text("filename\nimages_00000.tsv\n")
    return tmp_path


def test_public_tar_shards(tmp_path):
    _public_shard(tmp_path)
    for spec in ("training_0.tsv", "images_00000.tsv"):  # the file list, or one index file
        ds = build_dataset(str(tmp_path / spec), R)
        assert len(ds) == 3
        s = ds[(1, 0)]
        assert s["caption"] == "picture 1" and s["image"].shape == (16, 16, 3)
        assert tuple(s["image"][0, 0]) == (10, 20, 30) and np.array_equal(s["text_embedding"], np.ones((2, 4)))
        s = ds[(2, 0)]
        assert tuple(s["image"][0, 0]) == (20, 20, 30) and s["text_embedding"][0, 0] == 2 and s["_skipped"] == 0
        assert "text_embedding" not in ds[(0, 0)] and ds[(0, 0)]["_skipped"] == 0  # no text_file: none


def test_a_worker_process_opens_the_tars_again(tmp_path, monkeypatch):
    """Open tars are per process: after a fork (another pid) a worker never reads through its parent's
    file handles, whose offset the processes would share."""
    import os

    ds = build_dataset(str(_public_shard(tmp_path) / "images_00000.tsv"), R)
    ds[(1, 0)]
    parent = {path: entry[0] for path, entry in ds.tars.files.items()}  # the image and the text tar
    monkeypatch.setattr(os, "getpid", lambda: -1)
    assert ds[(1, 0)]["caption"] == "picture 1"
    assert len(parent) == 2 and all(ds.tars.files[p][0] is not tf for p, tf in parent.items())


def test_public_test_files_read_like_the_public_reader():
    from pathlib import Path

    files = Path("/tmp/pub/ml-mdm-matryoshka/tests/test_files/sample_training_0.tsv")
    if not files.exists():
        pytest.skip("public test files not unpacked here")
    ds = build_dataset(str(files), ReaderConfig(image_size=40))
    s = ds[(0, 0)]
    assert s["image"].shape == (40, 40, 3) and s["caption"].startswith("Manager in store")


def test_webdataset_shards_with_brace_expansion(tmp_path):
    """Members KEY.ext (any case); the last sample has a .caption, and a .json whose label is read but
    whose caption does not replace the .caption's. A shard of the braces that is missing is an error."""
    for shard in range(2):
        with tarfile.open(tmp_path / f"wds-{shard:03d}.tar", "w") as tf:
            for i in range(2):
                key = f"s{shard}_{i}"
                if shard == i == 1:
                    meta = json.dumps({"caption": "json caption", "label": 3}).encode()
                    files = ((".JPG", _png((100, 100, 0))), (".caption", f"text {key}".encode()), (".json", meta))
                else:
                    files = ((".jpg", _png((shard * 100, i * 100, 0))), (".txt", f"text {key}".encode()),
                             (".cls", str(shard * 2 + i).encode()))
                for ext, data in files:
                    _add(tf, key + ext, data)
    names = expand_braces(str(tmp_path / "wds-{000..001}.tar"))
    assert [n[-11:] for n in names] == ["wds-000.tar", "wds-001.tar"]
    ds = build_dataset(str(tmp_path / "wds-{000..001}.tar"), R)
    assert len(ds) == 4
    s = ds[(3, 0)]
    assert s["caption"] == "text s1_1" and s["label"] == 3 and s["_skipped"] == 0
    assert ds[(2, 0)]["caption"] == "text s1_0" and ds[(2, 0)]["label"] == 2
    with pytest.raises(ValueError, match="not a known dataset form"):
        build_dataset(str(tmp_path / "wds-{000..002}.tar"), R)


def test_arrays_and_digits(tmp_path):
    """uint8 or [0, 1] float arrays (rounded to the nearest level), grey ones read as RGB; the digits'
    0-16 levels span 0-255. Labels are optional, and must be one per image."""
    np.savez(tmp_path / "a.npz", images=np.random.randint(0, 255, (6, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(6))
    ds = build_dataset(str(tmp_path / "a.npz"), R)
    assert ds[(4, 0)]["label"] == 4 and ds[(4, 0)]["image"].shape == (16, 16, 3)
    grey = np.array([[[0.0, 0.003], [0.31, 1.0]]])  # (N, H, W) in [0, 1]
    np.savez(tmp_path / "grey.npz", images=grey)
    s = build_dataset(str(tmp_path / "grey.npz"), ReaderConfig())[(0, 0)]  # image_size -1: not resized
    assert "label" not in s and np.array_equal(s["image"], np.repeat(np.rint(grey[0] * 255)[..., None], 3, -1))
    with pytest.raises(ValueError, match="expected 6 labels, got 5"):
        ArrayDataset(np.zeros((6, 8, 8), np.uint8), np.arange(5), R)
    for dtype in (np.int64, np.uint16, np.bool_):  # saturated to white; their range is not known
        with pytest.raises(ValueError, match=f"expected uint8, or float in \\[0, 1\\], got {np.dtype(dtype)}"):
            ArrayDataset(np.full((2, 8, 8), 1, dtype), None, R)
    digits = build_dataset("sklearn:digits", ReaderConfig(image_size=32))
    assert len(digits) == 1797 and digits[(0, 0)]["image"].shape == (32, 32, 3)
    from sklearn.datasets import load_digits

    raw = build_dataset("sklearn:digits", ReaderConfig())[(5, 0)]["image"]  # (8, 8, 3)
    assert np.array_equal(raw[..., 1], np.floor(load_digits().images[5] / 16 * 255 + 0.5))


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        build_dataset("", R)
    with pytest.raises(ValueError, match="not a known dataset form"):
        build_dataset(str(tmp_path / "nothing.bin"), R)
    with pytest.raises(ValueError, match="captions.tsv"):
        build_dataset(str(tmp_path), R)
    (tmp_path / "t.tsv").write_text("name\tcaption\nx.png\thello\n")
    with pytest.raises(ValueError, match="file column"):
        build_dataset(str(tmp_path / "t.tsv"), R)
    (tmp_path / "h.tsv").write_text("file\tcaption\n")
    (tmp_path / "i.tsv").write_text("tar\tcaption\nx.tar\thello\n")
    (tmp_path / "list.tsv").write_text("filename\ni.tsv\n")
    (tmp_path / "lost.tsv").write_text("filename\ni.tsv\nnope.tsv\n")
    np.savez(tmp_path / "x.npz", pictures=np.zeros((1, 2, 2)))
    (tmp_path / "clips").mkdir()
    for spec, frames, match in (("absent.npz", 0, "no file"), ("absent.tsv", 0, "no file"), ("h.tsv", 0, "no rows"),
                                ("list.tsv", 0, "expected columns tar, file"), ("x.npz", 0, "expected arrays 'images'"),
                                ("lost.tsv", 0, r"lost.tsv: 1 index file\(s\) it lists do not exist, e.g. 'nope.tsv'"),
                                ("t.tsv", 4, "a folder of clips"), ("clips", 4, "no clips")):
        with pytest.raises(ValueError, match=match):
            build_dataset(str(tmp_path / spec), R, video_frames=frames)


def test_video_frames_tile_into_the_temporal_grid(tmp_path):
    """Frames in time order (digit runs compared as numbers) sampled evenly, frame i*n + j at grid cell
    (i, j); a random crop is the same for every frame of the clip; the grid side must divide image_size."""
    clip = tmp_path / "clip0"
    clip.mkdir()
    ramp = np.tile(np.arange(0, 240, 12, dtype=np.uint8), (10, 1))  # (H, W) = (10, 20): green along x
    for f in range(12):  # 12 frames on disk named as ffmpeg's %d names them, 4 sampled evenly: 0, 4, 7, 11
        Image.fromarray(np.stack([np.full_like(ramp, f * 20), ramp, 0 * ramp], -1)).save(clip / f"{f}.png")
    (tmp_path / "captions.tsv").write_text("file\tcaption\nclip0\ta red ramp\n")
    ds = build_dataset(str(tmp_path), ReaderConfig(image_size=16), video_frames=4)
    s = ds[(0, 0)]
    img = s["image"]
    assert img.shape == (16, 16, 3) and s["caption"] == "a red ramp"
    # frame i*n + j sits at grid cell (i, j): the layout `b c (n h) (m w) -> b (n m) c h w` reads back
    frames = torch.from_numpy(img).permute(2, 0, 1)[None].reshape(1, 3, 2, 8, 2, 8).permute(0, 2, 4, 1, 3, 5)
    reds = frames.reshape(1, 4, 3, 8, 8)[0, :, 0, 4, 4].tolist()
    assert reds == [0, 80, 140, 220]  # in time order: 10.png after 9.png (a text sort read frames 0, 2, 5, 9)
    img = build_dataset(str(tmp_path), ReaderConfig(image_size=16, random_crop=True), video_frames=4)[(0, 3)]["image"]
    tiles = [img[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8, 1] for i in range(2) for j in range(2)]  # (8, 8) greens
    assert all(np.array_equal(t, tiles[0]) for t in tiles)
    crops = {build_dataset(str(tmp_path), ReaderConfig(image_size=16, random_crop=True),
                           video_frames=4)[(0, seed)]["image"].tobytes() for seed in range(4)}
    assert len(crops) > 1  # the crop changes with the sample's seed
    with pytest.raises(ValueError, match="square"):
        build_dataset(str(tmp_path), ReaderConfig(image_size=16), video_frames=3)
    with pytest.raises(ValueError, match="divisible"):
        build_dataset(str(tmp_path), ReaderConfig(image_size=15), video_frames=4)
    with pytest.raises(ValueError, match="square"):
        tile_frames(np.zeros((3, 2, 2, 1)))
    t = tile_frames(np.arange(4 * 2 * 2 * 1).reshape(4, 2, 2, 1))
    assert t[:, :, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_a_clip_with_frames_of_several_sizes_is_read(tmp_path):
    """Each frame is resized and cropped on its own (the clip was skipped: its raw frames were stacked)."""
    clip = tmp_path / "clip0"
    clip.mkdir()
    for f, size in enumerate([(20, 10), (20, 10), (24, 12), (20, 10)]):
        Image.new("RGB", size, (60 * f, 0, 0)).save(clip / f"{f:03d}.png")
    s = build_dataset(str(tmp_path), ReaderConfig(image_size=16), video_frames=4)[(0, 0)]
    assert s["_skipped"] == 0 and s["image"].shape == (16, 16, 3)
    assert [int(s["image"][i * 8 + 4, j * 8 + 4, 0]) for i in range(2) for j in range(2)] == [0, 60, 120, 180]


def test_video_files_are_decoded_with_av(tmp_path, monkeypatch):
    """A video file's frames (through the `av` package, faked here) are sampled evenly as a folder's are;
    a file that fails to decode, or has no frames, is skipped as a corrupt image."""
    import sys
    import types

    clips = {"a.mp4": [np.full((8, 8, 3), 30 * f, np.uint8) for f in range(8)], "b.mp4": None, "c.mp4": []}

    class Container:
        def __init__(self, path):
            self.frames = clips[path[-5:]]
            if self.frames is None:
                raise RuntimeError("invalid data found when processing input")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def decode(self, video):
            return [types.SimpleNamespace(to_ndarray=lambda format, a=a: a) for a in self.frames]

    for name in clips:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # not installed: one clear error (files were skipped as corrupt)
    with pytest.raises(ValueError, match="decoding video files needs the `av` package"):
        build_dataset(str(tmp_path), ReaderConfig(image_size=16), video_frames=4)
    monkeypatch.setitem(sys.modules, "av", types.SimpleNamespace(open=Container))
    ds = build_dataset(str(tmp_path), ReaderConfig(image_size=16), video_frames=4)
    img = ds[(0, 0)]["image"]  # (16, 16, 3): frames 0, 2, 5, 7 in a 2 x 2 grid
    assert [img[0, 0, 0], img[0, 8, 0], img[8, 0, 0], img[8, 8, 0]] == [0, 60, 150, 210]
    assert ds[(1, 0)]["_skipped"] == 2  # b and c skipped: a again


def test_sharded_sampler_is_a_pure_function_of_the_step():
    one = list(ShardedSampler(10, 2, accumulations=2, seed=3, num_steps=3))
    two = [list(ShardedSampler(10, 2, rank=r, world_size=2, seed=3, num_steps=3)) for r in range(2)]
    # one process with 2 accumulations reads, per step, rank 0's shard then rank 1's shard
    merged = [x for k in range(3) for r in range(2) for x in two[r][2 * k:2 * k + 2]]
    assert one == merged
    resumed = list(ShardedSampler(10, 2, accumulations=2, seed=3, start_step=1, num_steps=2))
    assert resumed == one[4:]
    for r in range(2):  # a rank resumed at step 1 starts a global batch (2 ranks x 2) in, not its own batch
        assert list(ShardedSampler(10, 2, rank=r, world_size=2, seed=3, start_step=1, num_steps=2)) == two[r][2:]
    assert sorted(i for i, _ in list(ShardedSampler(10, 5, seed=1, num_steps=2))) == list(range(10))  # an epoch
    # 2 ranks x 2 accumulations: rank r's micro-batch m is shard 2r + m of one process's 4 accumulations
    four = list(ShardedSampler(10, 2, accumulations=4, seed=3, num_steps=2))
    ranks = [list(ShardedSampler(10, 2, rank=r, world_size=2, accumulations=2, seed=3, num_steps=2)) for r in range(2)]
    assert four == [x for k in range(2) for r in range(2) for x in ranks[r][4 * k:4 * k + 4]]
    assert len(ShardedSampler(10, 2, accumulations=4, num_steps=2)) == len(four)
    # a resume with a smaller global batch (4 -> 2) goes on where the run stopped, 8 samples in
    smaller = list(ShardedSampler(10, 2, seed=3, start_step=2, start_position=8, num_steps=3))
    assert smaller == one[8:12] + list(ShardedSampler(10, 2, accumulations=2, seed=3, start_step=3, num_steps=1))[:2]
    with pytest.raises(ValueError, match="empty"):
        ShardedSampler(0, 2)


def test_the_loader_reads_what_its_sampler_names():
    """make_loader hands rank, world size, accumulations, seed and start step on: its micro-batches are
    the samples of that rank's sampler, in order (labels are the indices here)."""
    ds = ArrayDataset(np.zeros((10, 2, 2), np.uint8), np.arange(10), ReaderConfig())
    args = {"rank": 1, "world_size": 2, "accumulations": 2, "seed": 3, "start_step": 1, "num_steps": 2}
    labels = [x for b in make_loader(ds, 2, **args) for x in b["label"].tolist()]
    assert labels == [i for i, _ in ShardedSampler(10, 2, **args)] and len(labels) == 8


def test_every_epoch_and_seed_gives_a_new_order_and_new_crop_seeds():
    """Epoch e is a permutation of its own (not epoch 0's again, nor seed + 1's epoch e - 1); a sample's
    crop seed changes with the epoch and with the seed."""
    a = list(ShardedSampler(10, 10, seed=1, num_steps=2))  # two epochs of (index, seed)
    b = list(ShardedSampler(10, 10, seed=2, num_steps=1))
    orders = [[i for i, _ in a[:10]], [i for i, _ in a[10:]], [i for i, _ in b]]
    assert all(sorted(o) == list(range(10)) for o in orders) and orders[0] != orders[1] != orders[2]
    seeds = [dict(x) for x in (a[:10], a[10:], b)]
    assert all(seeds[0][i] != seeds[1][i] and seeds[0][i] != seeds[2][i] for i in range(10))


def _gray(rows) -> Image.Image:
    return Image.fromarray(np.asarray(rows, np.uint8)).convert("RGB")


def test_images_are_resized_as_the_public_reader_resizes_them(caplog):
    """mlx.data's resize: a triangle (bilinear) filter, the other side rounded half up (5 x 2 to a smaller
    side of 1 is 3 x 1, whose middle pixel the centre crop keeps); its centre crop rounds the offset down;
    smaller_side_size is not used."""
    step = _gray([[0, 0, 255, 255]] * 2)
    assert resize_crop(step, 4)[1, :, 0].tolist() == [0, 64, 191, 255]  # columns 2-5 of 8: linear, no overshoot
    ramp = _gray([[0, 60, 120, 180, 240]] * 2)
    assert resize_crop(ramp, 1)[0, 0, 0] == 120
    rows = _gray(np.repeat(np.arange(0, 170, 10)[:, None], 16, 1))  # (H, W) = (17, 16): row r is 10 r
    assert resize_crop(rows, 16)[0, 0, 0] == 0  # mlx's centre crop starts at (17 - 16) // 2 = 0
    ramp = _gray([np.arange(0, 240, 8)] * 20)  # 30 x 20
    reader = ReaderConfig(image_size=16, smaller_side_size=32)
    ds = build_dataset("sklearn:digits", reader)
    assert "smaller_side_size 32 is not used" in caplog.text
    png = io.BytesIO()
    ramp.save(png, format="PNG")
    assert np.array_equal(ds.image(png.getvalue(), None), resize_crop(ramp, 16))


def test_16_bit_grey_images_keep_their_high_byte():
    """As stb_image decodes them for the public reader; PIL's own conversion clips them to white."""
    png = io.BytesIO()
    Image.fromarray(np.array([[40000, 1000]], np.uint16)).save(png, format="PNG")
    assert decode_image(png.getvalue()).getpixel((0, 0)) == (156, 156, 156)
    assert decode_image(png.getvalue()).getpixel((1, 0)) == (3, 3, 3)


def test_resize_crop_and_range():
    """image_size <= 0 keeps the image; the model range is (x - 127) / 128, channels first; a batch has
    labels only where every sample has one."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    assert resize_crop(img, 16).shape == (16, 16, 3) and resize_crop(img, 0).shape == (20, 40, 3)
    x = to_model_range(torch.tensor([[[[0, 127, 255]]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 1, 1) and torch.allclose(x.flatten(), torch.tensor([-127 / 128, 0.0, 1.0]))
    u8 = torch.randint(0, 256, (2, 3, 5, 3), dtype=torch.uint8)  # (B, H, W, C)
    assert torch.equal(to_model_range(u8), (u8.double().permute(0, 3, 1, 2) - 127).div(128).float())
    with pytest.raises(ValueError, match="different shapes"):
        collate([{"image": np.zeros((4, 4, 3), np.uint8)}, {"image": np.zeros((5, 5, 3), np.uint8)}])
    assert "label" not in collate([{"image": np.zeros((4, 4, 3), np.uint8), "label": 1},
                                   {"image": np.zeros((4, 4, 3), np.uint8)}])


def test_random_crops_cover_every_offset_and_follow_the_rng():
    """A random crop is uniform over every window (the last one too); the same generator seed gives
    the same crop."""
    img = _gray(np.repeat(np.arange(0, 180, 10)[:, None], 16, 1))  # (H, W) = (18, 16): row r is 10 r
    tops = [resize_crop(img, 16, True, np.random.default_rng(s))[0, 0, 0] for s in range(40)]
    assert sorted(set(tops)) == [0, 10, 20]
    assert tops == [resize_crop(img, 16, True, np.random.default_rng(s))[0, 0, 0] for s in range(40)]


def test_reader_config_defaults_are_the_public_ones():
    """apple/ml-mdm's reader.ReaderConfig defaults (reader.py), which configs that omit a field rely on."""
    from dataclasses import asdict

    assert asdict(ReaderConfig()) == {
        "smaller_side_size": -1, "max_caption_length": -1, "max_token_length": -1, "image_size": -1,
        "random_crop": False, "num_kept_files": -1, "num_readers": 16, "shuffle_buffer_size": 9600,
        "reader_buffer_size": 9600, "endpoint_url": "", "bucket": "mlx", "prepad_caption_with_space": True,
        "use_tokenizer_scores": True, "prepad_bos": False, "append_eos": True, "padding_token": "<pad>",
        "pad_to_max_length": False}


def test_workers_give_the_same_batches(tmp_path):
    """Random crops are a function of the sample's seed, not of the process that reads it (the images are
    vertical ramps, so that crops at other offsets differ); a file dataset crops at random only with
    reader_config.random_crop."""
    _folder(tmp_path)
    for i in range(5):
        _gray(np.repeat(np.arange(i, 240 + i, 10)[:, None], 20, 1)).save(tmp_path / f"img{i}.png")  # (H, W) = (24, 20)
    ds = build_dataset(str(tmp_path), ReaderConfig(image_size=16, random_crop=True))
    a = [b["image"] for b in make_loader(ds, 2, seed=1, num_steps=3, num_workers=0)]
    b = [b["image"] for b in make_loader(ds, 2, seed=1, num_steps=3, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 3
    assert all(np.array_equal(ds[i]["image"], ds[(i, i)]["image"]) for i in range(5))  # an index is its own seed
    # reader_config.random_crop is read: seeds give several crops of a file, and without it the centre one
    assert len({ds[(0, s)]["image"][0, 0, 0] for s in range(8)}) > 1
    centre = build_dataset(str(tmp_path), ReaderConfig(image_size=16))
    want = resize_crop(Image.open(tmp_path / "img0.png"), 16)  # (16, 16, 3) of the (19, 16) resize
    assert all(np.array_equal(centre[(0, s)]["image"], want) for s in range(8))


def test_precomputed_text_embeddings_are_padded_with_a_mask(tmp_path):
    """Embeddings (T, D), or (1, T, D) as saved with a batch axis, padded to the longest with a mask that
    leaves out all-zero rows."""
    _folder(tmp_path)
    rows = ["file\tcaption\ttext_embedding"]
    for i in range(2):
        np.save(tmp_path / f"e{i}.npy", np.full((1, 2 + i, 6)[1 - i:], i + 1, np.float32))  # (2, 6), (1, 3, 6)
        rows.append(f"img{i}.png\tc{i}\te{i}.npy")
    (tmp_path / "emb.tsv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(str(tmp_path / "emb.tsv"), R)
    batch = collate([ds[(0, 0)], ds[(1, 0)]])
    assert batch["text_embedding"].shape == (2, 3, 6)
    assert batch["text_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["text_embedding"][0, 2].abs().sum() == 0 and batch["text_embedding"][1, 2, 0] == 2
    # stored zero rows (an encoder's output padded to a fixed length, as the public precompute saves it) are
    # padding: masked, as the public mask from the caption's tokens masks them (they were kept as tokens)
    padded = np.zeros((4, 6), np.float32)
    padded[:2] = 1
    batch = collate([{**ds[(0, 0)], "text_embedding": padded}, ds[(1, 0)]])
    assert batch["text_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
