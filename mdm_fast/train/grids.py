"""Sampling for people to look at: generate images for prompts/labels and lay them out in a grid
(one row per prompt, every resolution of each sample side by side, lowest first)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mdm_fast.files import save_image_atomic

log = logging.getLogger(__name__)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), the inverse of the reader's (x - 127) / 128."""
    x = (x.detach().float().cpu().clamp(-1, 1) * 128.0 + 127.0).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(x: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) or (B, H, W) -> (B, C, H, W) in [-1, 1]: the inverse of :func:`to_uint8` (exactly:
    ``to_uint8(from_uint8(x)) == x``)."""
    t = torch.tensor(np.asarray(x), dtype=torch.float32)
    t = t.unsqueeze(-1) if t.dim() == 3 else t
    return ((t - 127.0) / 128.0).permute(0, 3, 1, 2)


def side_by_side(levels: Sequence[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Levels (highest first, (B, C, H_l, W_l)) -> (B, C, H, L*W + gaps), lowest first, each level
    enlarged to the top size with nearest neighbours so its pixels stay visible; gaps are white."""
    top = levels[0].shape[-1]
    tiles = []
    for lvl in reversed(list(levels)):
        tiles.append(F.interpolate(lvl.float(), size=(top, top), mode="nearest"))
        tiles.append(torch.ones(*lvl.shape[:2], top, gap))
    return torch.cat(tiles[:-1], dim=-1)


def grid_image(levels: Sequence[torch.Tensor], rows: int, row_labels: Optional[List[str]] = None,
               scale: int = 1, pad: int = 4) -> Image.Image:
    """All samples (B = rows * cols, row-major) as one image; each cell shows every resolution."""
    cells = to_uint8(side_by_side([lvl.cpu() for lvl in levels]))  # (B, H, W', C)
    b, h, w, c = cells.shape
    if b % rows:
        raise ValueError(f"grid: {b} samples do not fill {rows} rows")
    cols = b // rows
    label_w = 0
    if row_labels:
        label_w = 8 + 7 * max(len(s) for s in row_labels)
    H, W = rows * (h * scale + pad) + pad, label_w + cols * (w * scale + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        r, col = divmod(i, cols)
        tile = Image.fromarray(cells[i].squeeze(-1) if c == 1 else cells[i])
        if scale != 1:
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + col * (w * scale + pad), pad + r * (h * scale + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((4, pad + r * (h * scale + pad) + h * scale // 2 - 5), text, fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def generate(diffusion, model, encoder, prompts: Sequence[str], per_prompt: int, image_size: int,
             device: torch.device, *, steps: int = 50, guidance: float = 1.0, seed: int = 0,
             generator: Optional[torch.Generator] = None, negative_prompt: Optional[str] = None,
             ddim_eta: Optional[float] = None, progress: bool = False, cuda_graphs: Optional[bool] = None,
             cache: Optional[dict] = None, autocast: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Samples for every prompt (``per_prompt`` each, prompt-major): the list of levels, highest first.

    Noise comes from ``generator`` (on ``device``; a caller sampling several batches passes each its
    own, seeded apart, as ``mdm-fast sample`` does, or one for all), else from a new one seeded with
    ``seed``. With ``guidance`` != 1 the unconditional rows are the encoder's null (a text encoder's: the
    empty caption's encoding, as the public sampler's default), or ``negative_prompt`` encoded as a
    prompt is (the prompts and it are padded to the longer, as the public code encodes them in one batch).

    ``cuda_graphs``: each denoising step (every level, guidance, sampler update) is captured once and
    replayed (:func:`mdm_fast.engine.graphed_sampler_step`); needs a CUDA device. None: on CUDA (an
    eager step is bound by the host's launch time: 105 ms against 15.5 ms replayed for the 256x256
    NCHW model at batch 2 on an H200). ``cache``: a dict kept across calls (batches of one sampling
    job): the sampler, the conditioning buffers the steps read and the captured step are made once per
    shape and reused, so later batches neither compile nor capture again; it keeps the
    ``MAX_PIPELINES`` shapes used last (captions padded to their batch's longest make a shape per
    length), whose captured steps share one memory pool. ``autocast``: the model runs
    under torch.autocast to that dtype (see :func:`mdm_fast.diffusion.sampler.make_denoise`)."""
    from mdm_fast.text import encode_prompts, pad_tokens

    expanded = [p for p in prompts for _ in range(per_prompt)]
    cond, mask = encode_prompts(encoder, expanded, device)
    uncond = None
    if guidance != 1.0:
        uncond = (encoder.null(1, device) if negative_prompt is None
                  else encode_prompts(encoder, [negative_prompt], device, what="negative_prompt"))
        tokens = max(cond.shape[1], uncond[0].shape[1])
        cond, mask = pad_tokens(cond, tokens), pad_tokens(mask, tokens)
    elif negative_prompt is not None:
        raise ValueError("negative_prompt: only used with guidance != 1 (classifier-free guidance)")
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    if generator is None:
        generator = torch.Generator(device).manual_seed(seed)
    key = (tuple(cond.shape), tuple(mask.shape), image_size, steps, guidance, negative_prompt, ddim_eta,
           cuda_graphs, autocast)
    pipe = None if cache is None else cache.pop(key, None)
    fresh = pipe is None
    if fresh:
        pool = next((p.pool for p in (cache or {}).values() if p.pool is not None), None)
        if cuda_graphs and pool is None:
            pool = torch.cuda.graph_pool_handle()
        pipe = _Pipeline.make(diffusion, model, cond, mask, uncond, steps, guidance, ddim_eta, cuda_graphs,
                              autocast, pool)
    else:
        pipe.cond.copy_(cond)
        pipe.mask.copy_(mask)
    if cache is not None:  # the most recently used last; the least recently used goes beyond MAX_PIPELINES
        cache[key] = pipe
        while len(cache) > MAX_PIPELINES:
            del cache[next(iter(cache))]
    x_t = pipe.sampler.initial_noise(len(expanded), _channels(model), image_size, generator=generator,
                                     device=device)
    if fresh and device.type == "cuda":  # compile the steps' Triton kernels in parallel, before the first
        stats = pipe.sampler.precompile(pipe.denoise, x_t)
        if stats is not None and stats.kernels:
            log.info("sampling: %s", stats)
    levels = x_t
    bar = tqdm(total=len(pipe.sampler.timesteps) - 1, desc="sampling", disable=not progress, leave=False)
    for step in pipe.sampler.steps(pipe.denoise, x_t, generator=generator, step_fn=pipe.step_fn):
        levels = step.x_s
        bar.update(1)
    bar.close()
    return pipe.sampler.to_images(levels)


MAX_PIPELINES = 16  # batch shapes a generate() cache keeps (each with its input and output buffers)


@dataclass
class _Pipeline:
    """What a batch of one shape is sampled with: the denoiser reads ``cond`` and ``mask`` (buffers a
    later batch copies its conditioning into) and ``step_fn`` replays the captured step (or is None)."""

    sampler: object
    denoise: Callable
    cond: torch.Tensor
    mask: torch.Tensor
    step_fn: Optional[Callable]
    pool: Any  # the captured steps' memory pool, shared by a cache's pipelines (None without graphs)

    @staticmethod
    def make(diffusion, model, cond, mask, uncond, steps, guidance, ddim_eta, cuda_graphs,
             autocast, pool) -> "_Pipeline":
        kwargs = {}
        if uncond is not None:
            kwargs = {"uncond_conditioning": uncond[0], "uncond_mask": uncond[1]}
        sampler = diffusion.sampler(num_inference_steps=steps, ddim_eta=ddim_eta)
        cond, mask = cond.clone(), mask.clone()
        denoise = diffusion.make_denoise(model, cond, mask, guidance_scale=guidance, autocast=autocast, **kwargs)
        step_fn = None
        if cuda_graphs:
            from mdm_fast.engine import graphed_sampler_step

            step_fn = graphed_sampler_step(sampler, denoise, pool=pool)
        return _Pipeline(sampler, denoise, cond, mask, step_fn, pool)


def _channels(model) -> int:
    from mdm_fast.train.distributed import unwrap

    m = unwrap(model)
    for name in ("input_channels", "in_channels"):
        if isinstance(getattr(m, name, None), int):
            return getattr(m, name)
    return 3


def save_grid(levels: Sequence[torch.Tensor], path: Path, rows: int, row_labels: Optional[List[str]] = None,
              scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(grid_image(levels, rows, row_labels, scale), path)
    return path
