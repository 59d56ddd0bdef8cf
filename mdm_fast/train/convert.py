"""Checkpoint conversion between the public format and ours, without touching a single weight.

- public: ``{"state_dict": weights, ...}`` (the public trainer adds ``batch_num``, losses and a pickled
  ``args``), one file per EMA / non-EMA model;
- ours: the same ``state_dict`` at the top level plus ``ema_state_dict``, optimizer, scheduler, RNG,
  ``step`` and the config (see :mod:`mdm_fast.train.checkpoint`).
Weights are copied as they are (same keys, order, dtypes and bits), so public -> ours -> public
reproduces the public file's ``state_dict`` exactly, and ours -> public -> ours keeps the weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from mdm_fast.train.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_weights, save_atomic

_NUMERIC_EXTRAS = ("batch_num", "loss", "best_avg_loss", "exp_avg_loss", "exp_avg_loss_var")


def convert(src: str, dst: str, to: str, use_ema: bool = False, config: Optional[str] = None,
            trust_pickle: bool = False, text_dim: int = 0) -> Dict[str, Any]:
    """Convert ``src`` to format ``to`` ("ours" or "public") at ``dst``; returns a short report. With
    ``config`` (to ours) the weights must fit the model it builds at ``text_dim`` (0: the config's text
    width, else, where the config does not tell it, the file's)."""
    if to not in ("ours", "public"):
        raise ValueError(f"convert: --to must be 'ours' or 'public', got {to!r}")
    if use_ema and to == "ours":
        raise ValueError("convert: --ema exports the EMA weights --to public; --to ours keeps every set of weights "
                         "the file has (a public file's one set becomes the state_dict the EMA starts from)")
    try:
        ckpt = load_checkpoint(Path(src), trust_pickle=trust_pickle)
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    if to == "public":
        if use_ema and "ema_state_dict" not in ckpt:
            raise ValueError(f"{src} has no EMA weights (ema_state_dict); drop --ema")
        state = ckpt["ema_state_dict"] if use_ema else ckpt["state_dict"]
        out: Dict[str, Any] = {"state_dict": state}
        if "step" in ckpt or "batch_num" in ckpt:
            out["batch_num"] = int(ckpt.get("batch_num", ckpt.get("step", 0)))
    else:
        out = {"state_dict": ckpt["state_dict"], "format": FORMAT}
        for k in _NUMERIC_EXTRAS:
            if isinstance(ckpt.get(k), (int, float)):
                out[k] = ckpt[k]
        out["step"] = int(ckpt.get("step", ckpt.get("batch_num", 0)))
        for k in ("ema_state_dict", "ema", "config", "model", "text_dim", "seed"):
            if k in ckpt:
                out[k] = ckpt[k]
        if config:
            from mdm_fast.config import load_experiment

            cfg = load_experiment(config)
            _check_fits(cfg, out["state_dict"], Path(src), text_dim, int(ckpt.get("text_dim") or 0))
            out["config"], out["model"] = cfg.to_yaml(), cfg.model
    save_atomic(out, Path(dst))
    return {"input": str(src), "output": str(dst), "to": to, "tensors": len(out["state_dict"]),
            "ema": bool(use_ema)}


def _check_fits(cfg, state: Dict[str, Any], src: Path, text_dim: int, file_text_dim: int) -> None:
    """``state`` loads strictly into the model ``cfg`` builds (on the meta device: names and shapes only);
    else a ValueError naming ``src`` and the first mismatches, before anything is written."""
    from mdm_fast.config import text_width
    from mdm_fast.reference import build_model

    try:
        width = text_width(cfg, text_dim)
    except ValueError:  # a text model of unknown width: the file's, which its trainer's encoder gave
        if text_dim or not file_text_dim:
            raise
        width = file_text_dim
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.unet_dict(width))
    with warnings.catch_warnings():  # copying into meta parameters is the no-op wanted here
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        load_weights(model, state, src)
