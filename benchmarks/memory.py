"""What a training step of a public model keeps for backward, counted on any machine (no GPU needed).

    python -m benchmarks.memory [--model 256x256] [--batch 1] [--out DIR]
    python -m benchmarks.memory --gpu [--model 256x256] [--out DIR]   (a GPU: one step measured by phase)

Runs one forward of the fast model on CPU in fp32 at the given batch with a saved-tensor hook that records
every tensor autograd keeps for backward (each storage once, parameters excluded), through the same
custom-op paths a GPU takes (the group norm is forced onto its custom op, which keeps only x and the
statistics; attention onto the fused Triton op, computed here by a stand-in), once with the norm outputs
recomputed in backward (the default) and once keeping them. Reports the bytes by the op that produced
each kept tensor, and a bf16 estimate of the train step's peak at a larger batch: kept activations x
batch / 2 (bf16) + weights, gradients and AdamW state (16 bytes per parameter).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from benchmarks.common import knob, markdown_table, write_atomic
from benchmarks.models import TEXT_TOKENS, TEXT_WIDTH, public_config

GPU_BATCH = {"256x256": 16, "1024x1024": 4}  # the train-step batches of the model suite


class _AttentionStandIn:
    """The Triton attention kernels' forward computed by the reference formulation, so that the model
    runs the triton backend's custom op on CPU and autograd keeps what a GPU keeps: q, k, v (or the qkv
    projection), the text keys, the output and the log-sum-exp, not the (B, H, L, S) probabilities."""

    @staticmethod
    def forward(q, k, v, k_cond, v_cond, cond_mask, self_mask, scale, out):
        att = sys.modules["mdm_fast.ops.attention"]
        with torch.no_grad():
            out.copy_(att._torch_attention("ref", q, k, v, k_cond, v_cond, cond_mask, self_mask, scale))
        return att._lse_like(q).zero_()


@contextlib.contextmanager
def gpu_custom_ops() -> Iterator[None]:
    """Inside the block (restored after), the model takes a GPU's custom-op paths on CPU, so that what
    autograd keeps is what a GPU keeps: the group norm runs its custom op (its CPU fast path is PyTorch
    autograd through the formula, which keeps intermediates), and attention the fused Triton op's, with a
    stand-in kernel; the other ops choose their backends as on a CPU without TRITON_INTERPRET."""
    import mdm_fast.ops.attention  # noqa: F401  (the modules, not the functions of the same names)
    import mdm_fast.ops.group_norm_act  # noqa: F401
    from mdm_fast.ops import dispatch

    gna, att = sys.modules["mdm_fast.ops.group_norm_act"], sys.modules["mdm_fast.ops.attention"]

    def norm_op(x, g, w, b, eps, sc, sh, act, xb):
        return gna.group_norm_act_fwd(x, w, b, sc, sh, g, float(eps), act or "none", "ref", None, xb)[0]

    reasons = dispatch.registered_ops()["attention"].reasons
    with knob(gna, "_plain_reference", norm_op), knob(att, "_kernels", lambda: _AttentionStandIn), \
            knob(dispatch, "triton_interpreting", lambda: False):  # the other ops as a GPU-less run picks them
        previous = reasons["triton"]
        reasons["triton"] = lambda *a, **k: None
        try:
            yield
        finally:
            reasons["triton"] = previous


def kept_by_op(model, args) -> Dict[str, int]:
    """Bytes kept for backward by one forward, by the grad_fn of each kept tensor."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: Dict[int, Tuple[int, str]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = (t.untyped_storage().nbytes(), type(t.grad_fn).__name__ if t.grad_fn else "input")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args)
    by_op: Dict[str, int] = collections.Counter()
    for nbytes, op in kept.values():
        by_op[op] += nbytes
    return dict(by_op)


def peak_activation_bytes(name: str, cfg: dict, size: int, batch: int, recompute: bool = True,
                          text_tokens: int = TEXT_TOKENS) -> int:
    """The peak of activation memory (what a GPU's peak counts beyond weights, gradients and optimizer
    state) of a bf16 train step, tracked on fake tensors (no GPU, seconds) with the ops a GPU runs
    (:func:`benchmarks.roofline.fake_gpu_model`). Unlike :func:`kept_by_op` it sees everything alive,
    whatever holds it (a hook that keeps a tensor, say)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from benchmarks.roofline import fake_gpu_model
    from mdm_fast.models import set_norm_recompute

    with fake_gpu_model(name, cfg, size, batch, text_tokens) as (model, args):
        set_norm_recompute(model, recompute)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            with torch.autocast("cpu", torch.bfloat16):
                out = model(*args)
            sum(o.float().square().mean() for o in out).backward()
        return next(iter(tracker.get_tracker_snapshot("peak").values()))[_MemRefType.ACT]


def run(stem: str, batch: int) -> str:
    from mdm_fast import build_model
    from mdm_fast.models import set_norm_recompute

    name, cfg, size = public_config(stem)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name, cfg)
    x_t = [torch.randn(batch, 3, size // r, size // r) for r in model.resolution_ratios()]
    mask = torch.ones(batch, TEXT_TOKENS)
    mask[:, TEXT_TOKENS // 2:] = 0
    args = (x_t, torch.randint(0, 1000, (batch,)), torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH), mask)
    counts = {}
    with gpu_custom_ops():
        for recompute in (True, False):
            set_norm_recompute(model, recompute)
            counts[recompute] = kept_by_op(model, args)
    totals = {k: sum(v.values()) for k, v in counts.items()}
    ops = sorted(set(counts[True]) | set(counts[False]), key=lambda o: -counts[False].get(o, 0))
    rows = [[op, counts[False].get(op, 0) / 1e6, counts[True].get(op, 0) / 1e6] for op in ops]
    rows.append(["total", totals[False] / 1e6, totals[True] / 1e6])
    table = markdown_table(["kept tensor produced by", "MB, norms kept", "MB, norms recomputed (default)"], rows)
    n_params = sum(p.numel() for p in model.parameters())
    state_gb = 16 * n_params / 1e9  # fp32 weights + gradients + AdamW's two moments
    big = GPU_BATCH.get(stem, batch)
    est = {k: v / batch * big / 2 / 1e9 + state_gb for k, v in totals.items()}
    tracked = {k: peak_activation_bytes(name, cfg, size, big, k) / 1e9 for k in (True, False)}
    return (f"# Activation memory of a {stem} train step (counted on CPU, fp32, batch {batch})\n\n{table}\n\n"
            f"Estimated bf16 peak at batch {big}: {est[True]:.1f} GB with the default (norm outputs recomputed), "
            f"{est[False]:.1f} GB keeping them ({state_gb:.1f} GB of it weights, gradients and AdamW state for "
            f"{n_params / 1e6:.1f} M parameters; transient buffers not counted).\n\n"
            f"Activation peak of a bf16 train step at batch {big}, tracked on fake tensors (everything alive, "
            f"transients included; weights, gradients and optimizer state not): {tracked[True]:.2f} GB with the "
            f"default, {tracked[False]:.2f} GB keeping the norm outputs.\n")


class _Phases:
    """Peaks of allocated memory per phase of a train step on a GPU, over what was allocated before it."""

    def __init__(self):
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        self.rows: List[list] = []
        torch.cuda.reset_peak_memory_stats()

    def mark(self, phase: str) -> None:
        torch.cuda.synchronize()
        now, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        self.rows.append([phase, (peak - self.base) / 1e9, (now - self.base) / 1e9])
        torch.cuda.reset_peak_memory_stats()


def gpu_phases(stem: str, batch: int) -> str:
    """One eager bf16 train step of the fast model on this GPU (the models suite's loss, weights cast as
    the trainer casts them, and fused AdamW), after a warm-up step: the peak and the live memory of each
    phase over the weights and optimizer state. Beside the fake-tensor count (:func:`with_tracked`), the
    difference is what tensors do not show: cuDNN's and cuBLAS's workspaces, the allocator's rounding."""
    from benchmarks import models as bm

    name, cfg, size = public_config(stem)
    model = bm.build(stem, fast=True)
    args = bm.inputs(model, size, batch)
    targets = [torch.randn_like(x) for x in args[0]]
    loss_fn = bm.train_loss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for _ in range(2):  # a warm-up step (AdamW allocates its state), then the measured one
        opt.zero_grad(set_to_none=True)
        phases = _Phases()
        loss = loss_fn(*args, targets)
        phases.mark("forward")
        loss.backward()
        del loss
        phases.mark("backward")
        opt.step()
        phases.mark("AdamW step")
    state = phases.base / 1e9
    table = markdown_table(["phase", "peak GB over weights + state", "live GB after it"], phases.rows)
    return (f"## Measured on {torch.cuda.get_device_name()}: one eager train step, batch {batch}\n\n{table}\n\n"
            f"Before the step: {state:.2f} GB allocated (weights, AdamW state, inputs; gradients freed).\n")


def with_tracked(text: str, stem: str, batch: int) -> str:
    """The measured table and the fake-tensor activation peak of the same step (half a minute on a CPU:
    run after the measured table is written, so a time limit cannot take it)."""
    name, cfg, size = public_config(stem)
    tracked = peak_activation_bytes(name, cfg, size, batch) / 1e9
    return (text + f"\nFake-tensor activation peak of the same step (no GPU): {tracked:.2f} GB; the forward's "
            "measured peak over it is what the tensors do not show.\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["256x256", "1024x1024"], default="256x256")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gpu", action="store_true",
                   help="measure one train step at the models suite's batch on this GPU "
                        "(memory-<model>-<card>.md)")
    p.add_argument("--out", type=Path, default=None, help="write memory-<model>.md here")
    args = p.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.memory --gpu needs a CUDA device")
        from benchmarks.common import card_slug, report_head

        text = report_head(f"memory-{args.model}", "Peaks from torch.cuda.max_memory_allocated.") + \
            gpu_phases(args.model, GPU_BATCH[args.model])
        print(text, flush=True)
        for text in (text, with_tracked(text, args.model, GPU_BATCH[args.model])):
            if args.out:
                write_atomic(args.out / f"memory-{args.model}-{card_slug()}.md", text)
        print(text.splitlines()[-1])
        return
    text = run(args.model, args.batch)
    print(text)
    if args.out:
        write_atomic(args.out / f"memory-{args.model}.md", text)


if __name__ == "__main__":
    main()
