"""The public code's caption tokens for its T5 encoder (``language_models/tokenizer.py`` in t5 mode, as
``factory.create_tokenizer`` builds it from ``vocab_file``, and mlx.data's ``tokenize``), written anew.

- :class:`VocabTokenizer`: a vocabulary of ``piece<TAB>log-probability`` lines, ids in line order, ``▁`` read
  as a space; a text's UTF-8 bytes split into the pieces of the highest total log-probability. Bytes that no
  piece covers are dropped (mlx's ``ignore_unk``: the bytes since the last piece that ended are dropped with
  them). Ties between splits of equal score may resolve differently from mlx's search.
- :class:`CaptionTokens`: the reader config's rules on top, as the public reader applies them to training
  captions (``reader.py``: a space on both sides, no cut: longer captions' samples are dropped) and as
  ``reader.process_text`` applies them to prompts (cut to ``max_caption_length`` characters, a space in front
  with ``prepad_caption_with_space``, the tokens cut to ``max_token_length``). ``</s>`` is appended with
  ``append_eos``, the t5 mode's ``<unk>`` prepended with ``prepad_bos``; batches are padded with
  ``padding_token``, and the mask is the tokens that are not that token.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import torch

SPACE = "\u2581"


def piece_key(piece: str) -> bytes:
    """A vocabulary piece as the tokenizer matches it: its UTF-8 bytes, the word-start mark a space."""
    return piece.replace(SPACE, " ").encode("utf-8")


class VocabTokenizer:
    """Unigram tokenizer over ``(piece, log-probability)`` pairs, ids in their order."""

    def __init__(self, pieces: Iterable[Tuple[str, float]], source: str = "vocabulary"):
        self.ids, self.scores, self.prefixes = {}, [], set()
        for piece, logp in pieces:
            key = piece_key(piece)
            if key in self.ids:
                raise ValueError(f"{source}: piece {piece!r} appears twice")
            self.ids[key] = len(self.scores)
            self.scores.append(-float(logp))
            self.prefixes.update(key[:n] for n in range(1, len(key)))
        self.source = source
        self.eos, self.bos = self.token_id("</s>"), self.token_id("<unk>")

    @classmethod
    def from_vocab_file(cls, path: Path) -> "VocabTokenizer":
        """The public ``.vocab`` format: ``piece<TAB>score`` per line (``data/t5.vocab``)."""
        with open(path, "rb") as f:
            lines = [line.rstrip().split(b"\t") for line in f]
        if any(len(fields) != 2 for fields in lines):
            raise ValueError(f"vocab_file {path}: expected 'piece<TAB>score' on every line")
        return cls(((p.decode("utf-8"), float(s)) for p, s in lines), str(path))

    def __len__(self) -> int:
        return len(self.scores)

    def token_id(self, piece: str) -> int:
        tid = self.ids.get(piece.encode("utf-8"))
        if tid is None:
            raise ValueError(f"token {piece!r} is not in {self.source}")
        return tid

    def tokenize(self, text: str) -> List[int]:
        """The ids of the best split of ``text``'s bytes (see the module docstring for unknown bytes)."""
        data = text.encode("utf-8")
        dist, back = [0.0], [(-1, -1)]  # per lattice node (a byte where pieces ended): best score, (node, id)
        hyps = [(0, 0)]  # open pieces: (the node they start from, their first byte)
        last = 0  # the node of the latest byte where a piece ended
        for t in range(len(data)):
            ends, alive = [], []
            for node, start in hyps:
                piece = data[start:t + 1]
                tid = self.ids.get(piece)
                if tid is not None:
                    ends.append((dist[node] + self.scores[tid], node, tid))
                if piece in self.prefixes:
                    alive.append((node, start))
            if ends:
                best = min(ends, key=lambda e: e[0])
                dist.append(best[0])
                back.append(best[1:])
                last = len(dist) - 1
                hyps = [(last, t + 1)] + alive
            else:
                hyps = alive or [(last, t + 1)]  # nothing covers byte t: drop it, restart after the last piece
        ids, node = [], last
        while node > 0:
            node, tid = back[node]
            ids.append(tid)
        return ids[::-1]


def load_vocab(vocab_file: str, model_folder: str) -> VocabTokenizer:
    """The public ``vocab_file`` where it exists, else the T5 vocabulary saved with the model (the Unigram
    model of its ``tokenizer.json``: the same pieces and ids, with unrounded scores)."""
    saved = Path(model_folder).expanduser() / "tokenizer.json"
    model = json.loads(saved.read_text(encoding="utf-8")).get("model", {}) if saved.is_file() else {}
    if vocab_file and Path(vocab_file).is_file():
        vocab = VocabTokenizer.from_vocab_file(Path(vocab_file))
        if model.get("type") == "Unigram":  # another T5's vocabulary (an mT5's) would feed it wrong ids
            own = (piece_key(piece) for piece, _ in model["vocab"])
            differ = next((i for i, (a, b) in enumerate(zip(vocab.ids, own)) if a != b), None)
            if differ is not None:
                raise ValueError(f"vocab_file {vocab_file!r} is not the vocabulary of {model_folder} (their piece "
                                 f"{differ} differs: {model['vocab'][differ][0]!r} in the model's tokenizer.json); "
                                 "leave vocab_file out to use the model's own")
        return vocab
    if model.get("type") != "Unigram":
        raise ValueError(f"vocab_file {vocab_file!r}: no such file, and {model_folder} holds no T5 (Unigram) "
                         "tokenizer.json; set vocab_file to the public T5 vocabulary (ml-mdm's data/t5.vocab)")
    return VocabTokenizer(((piece, logp) for piece, logp in model["vocab"]), str(saved))


class CaptionTokens:
    """Token ids of captions under a reader config (see the module docstring). :meth:`training` is what the
    data loader's workers tokenize training captions with (the dataset drops captions over
    ``max_token_length`` by its length); :meth:`pad` makes the batch of their ids."""

    def __init__(self, vocab: VocabTokenizer, reader):
        if not reader.use_tokenizer_scores:
            raise ValueError("reader_config.use_tokenizer_scores: false is not supported (the public reader does "
                             "not tokenize training captions then)")
        check_pad_to_max(reader.max_token_length, reader.pad_to_max_length)
        self.vocab, self.reader = vocab, reader
        self.pad_id = vocab.token_id(reader.padding_token)

    def _ids(self, text: str) -> List[int]:
        r, v = self.reader, self.vocab
        return [v.bos] * r.prepad_bos + v.tokenize(text) + [v.eos] * r.append_eos

    def training(self, caption: str) -> List[int]:
        return self._ids(" " + caption + " ")

    def prompt(self, prompt: str) -> List[int]:
        r = self.reader
        if r.max_caption_length >= 0:
            prompt = prompt[:r.max_caption_length]
        return self._ids(" " * r.prepad_caption_with_space + prompt)

    def batch(self, texts: Sequence[str], training: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T) int64, mask (B, T)): padded to the longest (to ``max_token_length`` with
        ``pad_to_max_length``), cut to ``max_token_length``."""
        return self.pad([self.training(t) if training else self.prompt(t) for t in texts])

    def pad(self, rows: Sequence[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch` of captions already tokenized (by :meth:`training` or :meth:`prompt`)."""
        limit = self.reader.max_token_length if self.reader.max_token_length > 0 else math.inf
        length = limit if self.reader.pad_to_max_length else min(limit, max(map(len, rows), default=0))
        ids = torch.tensor([row[:length] + [self.pad_id] * (length - len(row)) for row in rows], dtype=torch.long)
        return ids.reshape(len(rows), length), (ids != self.pad_id).float().reshape(len(rows), length)


def check_pad_to_max(max_tokens: int, pad_to_max: bool) -> None:
    if pad_to_max and max_tokens < 1:
        raise ValueError("reader_config.pad_to_max_length needs reader_config.max_token_length > 0 "
                         f"(got {max_tokens})")
