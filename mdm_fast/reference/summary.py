"""A model's per-resolution structure, parameters and forward FLOPs per image.

Runs one forward on the meta device, so it costs seconds even for the 1024x1024 model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LevelSummary:
    depth: int  # 0 = outermost
    resolution: int  # pixels per side
    channels: List[int]
    attention: List[int]  # attention layers per resolution level
    params: int  # this level's own parameters (the inner UNet excluded)
    flops: float  # this level's own forward FLOPs per image


def _levels(model: nn.Module) -> List[nn.Module]:
    out = [model]
    while hasattr(out[-1], "inner_unet"):
        out.append(out[-1].inner_unet)
    return out


def _own_params(level: nn.Module) -> int:
    inner = set(id(p) for p in level.inner_unet.parameters()) if hasattr(level, "inner_unet") else set()
    return sum(p.numel() for p in level.parameters() if id(p) not in inner)


def _own_flops(counts, prefix: str) -> float:
    """FLOPs of the modules under ``prefix`` outside its inner UNet.

    The counter attributes work to modules called through ``__call__``; the levels' stages are
    plain methods, so sum the outermost called modules of this level (counts nest).
    """
    names = [n for n in counts if n.startswith(prefix + ".") and not n.startswith(prefix + ".inner_unet")]
    outermost = [n for n in names if not any(n.startswith(m + ".") for m in names)]
    return float(sum(counts[n] for n in outermost))


def summarize(model: nn.Module, image_size: int, text_tokens: int = 128) -> List[LevelSummary]:
    """Per nesting level, outermost first, for one image of ``image_size`` px at the top."""
    model.check_image_size(image_size)
    ratios = model.resolution_ratios()
    with torch.device("meta"):
        meta = _meta_copy(model)
        x = [torch.zeros(1, model.input_channels, image_size // r, image_size // r) for r in ratios]
        text = torch.zeros(1, text_tokens, max(model.input_conditioning_feature_dim, 1))
        counter = FlopCounterMode(display=False)
        with counter:
            meta(x if len(x) > 1 else x[0], torch.zeros(1, dtype=torch.long), text, torch.ones(1, text_tokens))
    counts = {name: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    out = []
    prefix = type(meta).__name__
    for depth, level in enumerate(_levels(model)):
        c = level.config
        out.append(LevelSummary(depth, image_size // ratios[depth], list(c.resolution_channels),
                                [c.num_attention_layers[i] if i in c.attention_levels else 0
                                 for i in range(len(c.resolution_channels))],
                                _own_params(level), _own_flops(counts, prefix)))
        prefix += ".inner_unet"
    return out


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy

    if all(p.is_meta for p in model.parameters()):
        return model
    clone = copy.deepcopy(model).to("meta")
    return clone


def describe(model: nn.Module, image_size: int, text_tokens: int = 128) -> str:
    """A printable table of :func:`summarize`."""
    levels = summarize(model, image_size, text_tokens)
    lines = [f"{type(model).__name__}: {len(levels)} resolution(s), top {image_size}px, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters, "
             f"{sum(lv.flops for lv in levels) / 1e9:.1f} GFLOP per image (forward)",
             "| level | resolution | channels per level | attention layers | parameters | GFLOP per image |",
             "|---|---|---|---|---|---|"]
    for lv in levels:
        lines.append(f"| {lv.depth} | {lv.resolution}px | {lv.channels} | {lv.attention} | {lv.params:,} | "
                     f"{lv.flops / 1e9:.1f} |")
    return "\n".join(lines)
