"""The fastest a model step could run on a card: every operator's floor, summed by kind, counted anywhere.

    python -m benchmarks.roofline [--model 256x256] [--kind forward|train] [--batch 32] [--out DIR]

The fast model runs on fake tensors (shapes only, no GPU, seconds) with what a GPU runs: channels_last,
the Triton custom ops, bf16 autocast, 128 text tokens of width 2048. Every operator it dispatches is
counted: convolutions and matmuls by their FLOPs, the fused attention by 4*B*L*(L+T)*C forward (2.5x that
backward, the convention of benchmarks/attention.py), the sub-pixel upsample-conv by its 4 taps per
output, and every operator by the bytes it reads and writes once. An operator's floor is the longer of
its FLOPs at the card's bf16 matmul rate and its bytes at the card's copy rate; a train step adds the
fused AdamW and the EMA update (28 and 12 bytes per fp32 parameter). The floor is a lower bound: it
assumes every kernel at its ceiling and nothing re-read; caches only ever save re-reads. A measured step
over it is the efficiency left; a goal under it is out of reach.

The default ceilings are the H200's measured in the lease of 2026-11-27 (787 TFLOP/s, 4190 GB/s);
--tflops / --gbps set another card's.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import knob, markdown_table, write_atomic
from benchmarks.models import TEXT_TOKENS, TEXT_WIDTH, public_config
from mdm_fast.models.cast_weights import CastEachCall, CastWeights

# an H200's: the bf16 matmul rate of an early lease (the committed tables measured 780-799), the copy rate of
# ../shared/reference/BASELINE.md (the committed tables: 4248-4262 GB/s)
H200_TFLOPS, H200_GBPS = 787.0, 4190.0
_FREE = {"aten.detach.default", "aten.lift_fresh.default", "aten.empty.memory_format", "aten.empty_strided.default",
         "aten.new_empty.default", "aten.new_empty_strided.default", "aten.empty_like.default"}


def _footprint(t: torch.Tensor) -> int:
    """Bytes a kernel must touch: a broadcast (stride 0) view is read once, not once per use."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
    return min(t.numel(), span) * t.element_size()


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _conv_flops(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, transposed: bool) -> float:
    taps = w.shape[2:].numel()
    if transposed:  # w: (Cin, Cout / groups, kh, kw): every input element meets Cout / groups x taps weights
        return 2.0 * x.numel() * w.shape[1] * taps
    return 2.0 * out.numel() * w.shape[1] * taps  # w: (Cout, Cin / groups, kh, kw)


def _flops(name: str, args, out) -> float:
    """FLOPs of the operators that do matmul-class work; 0 for the rest."""
    if name == "aten.convolution.default":
        return _conv_flops(out, args[0], args[1], args[6])
    if name == "aten.convolution_backward.default":
        grad, x, w = args[0], args[1], args[2]
        mask = args[10]
        one = _conv_flops(grad, x, w, args[7])
        return one * (int(mask[0]) + int(mask[1]))
    if name in ("aten.mm.default", "aten.bmm.default"):
        a, b = args[0], args[1]
        return 2.0 * a.numel() * b.shape[-1]
    if name in ("aten.addmm.default", "aten.baddbmm.default"):
        a, b = args[1], args[2]
        return 2.0 * a.numel() * b.shape[-1]
    if name.startswith("mdm_fast.attention_qkv_"):
        qkv, kv = (args[0], args[1]) if name.endswith("fwd.default") else (args[1], args[2])
        B, C3, L = qkv.shape
        T = kv.shape[1] if kv is not None else 0
        fwd = 4.0 * B * L * (L + T) * (C3 // 3)
        return fwd if name.endswith("fwd.default") else 2.5 * fwd
    if name == "mdm_fast.upsample_conv3x3.default":
        return 2.0 * out.numel() * args[1].shape[1] * 4  # the sub-pixel form: 2x2 taps per output pixel
    return 0.0


_KINDS = [("aten.convolution_backward", "convolution backward"), ("aten.convolution", "convolution"),
          ("mdm_fast.upsample_conv3x3", "upsample-conv (sub-pixel)"),
          ("mdm_fast.attention_qkv_bwd", "attention backward"),
          ("mdm_fast.attention_qkv_fwd", "attention (fused)"), ("mdm_fast.group_norm_act_bwd", "group norm backward"),
          ("mdm_fast.group_norm_act_fwd", "group norm (fused)"), ("aten.mm", "matmul"), ("aten.addmm", "matmul"),
          ("aten.bmm", "matmul"), ("aten.baddbmm", "matmul"), ("aten.cat", "concatenation (skips)"),
          ("mdm_fast.concat_channels", "concatenation (skips)"), ("aten._to_copy", "dtype casts"),
          ("aten._foreach_copy_", "dtype casts"),
          ("mdm_fast.bias_add", "conv bias (+ ResNet skip) adds"),
          ("aten.add", "residual adds and other adds"), ("aten.gelu", "GELU (attention FFN)"),
          ("aten._fused_adamw", "optimizer (fused AdamW)")]  # (the count adds the optimizer's bytes itself)
OTHER = "other elementwise / reductions"


def kind_of(name: str) -> Optional[str]:
    """The kind of the operator ``name`` ("aten.convolution.default"; a profiler's "aten::convolution"
    alike), or None for one filed under OTHER."""
    name = name.replace("::", ".")
    return next((k for prefix, k in _KINDS if name.startswith(prefix)), None)


# mdm_fast's Triton kernels, by the module that holds them: (their op's kind, the kind of those named _bwd*).
# A profiler may link their launches (Triton's, through the driver API) to no operator: on the H200 with
# torch 2.11 none of them was (the 23.6 ms 'not filed' of profile-256-forward-b32-nvidia-h200.md).
_TRITON_MODULES = {"group_norm": ("group norm (fused)", "group norm backward"),
                   "attention": ("attention (fused)", "attention backward"),
                   "concat": ("concatenation (skips)",) * 2, "bias_add": ("conv bias (+ ResNet skip) adds",) * 2,
                   "upsample_conv": ("upsample-conv (sub-pixel)",) * 2}


@functools.lru_cache(maxsize=None)
def triton_kernel_kinds() -> Dict[str, str]:
    """The kind of each Triton kernel (function name) of the modules in _TRITON_MODULES."""
    import triton

    kinds = {}
    for module, (fwd, bwd) in _TRITON_MODULES.items():
        for name, fn in vars(importlib.import_module(f"mdm_fast.kernels.{module}")).items():
            if isinstance(fn, triton.runtime.KernelInterface):
                kinds[name] = bwd if name.startswith("_bwd") else fwd
    return kinds


def _kind(name: str) -> str:
    return kind_of(name) or OTHER


@dataclass
class Tally:
    calls: Dict[str, int] = field(default_factory=lambda: collections.Counter())
    flops: Dict[str, float] = field(default_factory=lambda: collections.Counter())
    bytes: Dict[str, float] = field(default_factory=lambda: collections.Counter())
    floor_ms: Dict[str, float] = field(default_factory=lambda: collections.Counter())


class _Counter(TorchDispatchMode):
    def __init__(self, tflops: float, gbps: float):
        super().__init__()
        self.tally, self.tflops, self.gbps = Tally(), tflops, gbps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if func.is_view or name in _FREE or name.startswith("prim."):  # views and metadata: no kernel
            return out
        nbytes = sum(_footprint(t) for t in _tensors(list(args) + list((kwargs or {}).values())))
        nbytes += sum(_footprint(t) for t in _tensors(out))
        flops = _flops(name, args, out)
        kind = _kind(name)
        t = self.tally
        t.calls[kind] += 1
        t.flops[kind] += flops
        t.bytes[kind] += nbytes
        t.floor_ms[kind] += max(flops / (self.tflops * 1e9), nbytes / (self.gbps * 1e6))
        return out


@contextlib.contextmanager
def fake_gpu_model(name: str, cfg: dict, size: int, batch: int,
                   text_tokens: int = TEXT_TOKENS) -> Iterator[Tuple[torch.nn.Module, tuple]]:
    """(model, args): the fast model ``build_model(name, cfg)`` (channels_last) and a batch of inputs, on
    fake tensors (shapes only, no GPU) that stand for CUDA ones: the Triton custom ops run (their fake
    implementations), whatever TRITON_INTERPRET says. Use them inside the block."""
    from mdm_fast import build_model
    from mdm_fast.ops import dispatch

    with knob(dispatch, "triton_reason", lambda *t: None), knob(dispatch, "_on_interpreter", lambda *a: False):
        with warnings.catch_warnings(), FakeTensorMode():
            warnings.simplefilter("ignore")
            model = build_model(name, cfg, channels_last=True)
            x_t = [torch.randn(batch, 3, size // r, size // r) for r in model.resolution_ratios()]
            width = cfg.get("conditioning_feature_dim", TEXT_WIDTH)
            yield model, (x_t, torch.randint(0, 1000, (batch,)), torch.randn(batch, text_tokens, width),
                          torch.ones(batch, text_tokens))


def count(name: str, cfg: dict, size: int, kind: str, batch: int, tflops: float = H200_TFLOPS,
          gbps: float = H200_GBPS, text_tokens: int = TEXT_TOKENS, as_sampler: bool = True) -> Tally:
    """The tally of one forward (no_grad) or one forward + backward of the fast model ``build_model(name,
    cfg)`` at ``batch`` and image ``size``; a forward ``as_sampler`` runs as the sampler runs it, in its steady
    state: on weights cast once (CastWeights), after an uncounted call (what that first call caches, the
    batched projections' weights, is not counted); a train step as the trainer runs it (CastEachCall)."""
    with fake_gpu_model(name, cfg, size, batch, text_tokens) as (model, args):
        if kind == "forward" and as_sampler:
            sampler_model = CastWeights(model, torch.bfloat16)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                sampler_model(*args)
        counter = _Counter(tflops, gbps)
        with counter, torch.autocast("cpu", torch.bfloat16):
            if kind == "forward":
                with torch.no_grad():
                    (sampler_model if as_sampler else model)(*args)
            else:  # as the trainer runs it: the weights cast in one pass (CastEachCall)
                out = CastEachCall(model, model, torch.bfloat16)(*args)
                loss = sum(F.mse_loss(o.float(), torch.zeros_like(o, dtype=torch.float32)) for o in out)
        if kind == "train":
            with counter:
                loss.backward()
        n_params = sum(p.numel() for p in model.parameters())
    if kind == "train":  # fused AdamW: param, grad, 2 moments read, 3 written (fp32); EMA: 2 read, 1 written
        for label, per_param in (("optimizer (fused AdamW)", 28), ("EMA update", 12)):
            counter.tally.calls[label] += 1
            counter.tally.bytes[label] += per_param * n_params
            counter.tally.floor_ms[label] += per_param * n_params / (gbps * 1e6)
    return counter.tally


def report(stem: str, kind: str, batch: int, tally: Tally, tflops: float, gbps: float) -> str:
    total = sum(tally.floor_ms.values())
    rows = [[k, tally.calls[k], tally.flops[k] / 1e12, tally.bytes[k] / 1e9, tally.floor_ms[k],
             f"{100 * tally.floor_ms[k] / total:.0f}%"]
            for k in sorted(tally.floor_ms, key=lambda k: -tally.floor_ms[k])]
    rows.append(["total", sum(tally.calls.values()), sum(tally.flops.values()) / 1e12,
                 sum(tally.bytes.values()) / 1e9, total, "100%"])
    table = markdown_table(["operator kind", "calls", "TFLOP", "GB moved", "floor ms", "share"], rows)
    return (f"# Roofline floor: {stem} {kind}, batch {batch} (fast model, channels_last, bf16)\n\n{table}\n\n"
            f"Floors at {tflops:.0f} TFLOP/s and {gbps:.0f} GB/s (per operator, the longer of the two; summed). "
            f"{' '.join(__doc__.split(chr(10) + chr(10))[2].split())}\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["256x256", "1024x1024"], default="256x256")
    p.add_argument("--kind", choices=["forward", "train"], default="forward")
    p.add_argument("--batch", type=int, default=None, help="default: 32 (forward) / 16 (train) at 256x256, "
                                                            "8 / 4 at 1024x1024 (the models suite's)")
    p.add_argument("--tflops", type=float, default=H200_TFLOPS)
    p.add_argument("--gbps", type=float, default=H200_GBPS)
    p.add_argument("--out", type=Path, default=None, help="write roofline-<model>-<kind>-b<batch>.md here")
    args = p.parse_args(argv)
    batch = args.batch or {("256x256", "forward"): 32, ("256x256", "train"): 16,
                           ("1024x1024", "forward"): 8, ("1024x1024", "train"): 4}[(args.model, args.kind)]
    name, cfg, size = public_config(args.model)
    text = report(args.model, args.kind, batch, count(name, cfg, size, args.kind, batch, args.tflops, args.gbps),
                  args.tflops, args.gbps)
    print(text)
    if args.out:
        write_atomic(args.out / f"roofline-{args.model}-{args.kind}-b{batch}.md", text)


if __name__ == "__main__":
    main()
