"""The public models, side by side in one process: reference eager, reference + torch.compile,
mdm_fast eager, mdm_fast + CUDA graphs (and + torch.compile in the full suite).

    python -m benchmarks.models --suite quick|full [--out DIR]

Workloads (bf16 autocast as the public trainer, text width 2048, 128 tokens half masked):
256x256 forward batch 32 and batch 2, train step batch 16; 1024x1024 forward batch 8, train step
batch 4. "train step" = forward of every resolution + MSE on every output + backward + AdamW step
(the definition of shared/reference/BASELINE.md). Reports ms, speed-ups over reference eager and
compiled, TFLOP/s and MFU against the bf16 matmul rate measured in the same run, peak memory and
time to the first step. The quick suite skips torch.compile (2-4 minutes per model).
``--cudnn-benchmark`` runs the whole process with cuDNN's algorithm search on
(``torch.backends.cudnn.benchmark``, which neither the public code nor mdm_fast turns on) and writes
``models-cudnn-benchmark-<card>.md``: what that search is worth, against the default run's table. It
must be its own process: cuDNN keeps the plans it chose per convolution shape, search or not, so a
search turned on after other variants ran those shapes would search nothing.
The fast model's train rows run it as the trainer does, its weights cast by one multi-tensor copy per
step (``CastEachCall``); "peak GB" counts the measured model only (the other one's weights, resident
in the same process, are subtracted).
"""
from __future__ import annotations

import copy
import gc
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import (TRITON_COMPILES, WALL_TIMES, ceilings, markdown_table, parser,
                               record_triton_compiles, time_ms, write_report)
from mdm_fast.reference.data import reference_dir

try:  # process start, for the time to the first step
    import psutil

    PROCESS_START = psutil.Process().create_time()
except ImportError:
    PROCESS_START = time.time()

CONFIGS = reference_dir() / "ml-mdm-configs"
TEXT_WIDTH, TEXT_TOKENS = 2048, 128


@dataclass
class Workload:
    model: str  # "256x256" | "1024x1024"
    kind: str  # "forward" | "train"
    batch: int


QUICK = [Workload("256x256", "forward", 32), Workload("256x256", "forward", 2), Workload("256x256", "train", 16),
         Workload("1024x1024", "forward", 8), Workload("1024x1024", "train", 4)]


def public_config(stem: str):
    y = yaml.safe_load((CONFIGS / f"cc12m_{stem}.yaml").read_text())
    cfg = dict(y["unet_config"], conditioning_feature_dim=TEXT_WIDTH)
    cfg["initialize_inner_with_pretrained"] = None
    return y["model"], cfg, int(stem.split("x")[0])


def build(stem: str, fast: bool):
    from mdm_fast import build_model as build_fast
    from mdm_fast.reference import build_model as build_ref

    name, cfg, _ = public_config(stem)
    torch.manual_seed(0)
    with torch.device("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (build_fast if fast else build_ref)(name, cfg)
    with torch.no_grad():  # no zero weights: real data, not the zero-init shortcut
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@dataclass
class FirstStep:
    """Where the time from process start to the first mdm_fast step goes (seconds)."""

    total: float
    start_up: float  # process start -> this function (interpreter, imports, CUDA context, ceilings)
    build: float  # the 256x256 model built on the GPU
    step: float  # the first forward, Triton compilation included
    compiles: int  # Triton kernels compiled (or loaded from the disk cache) during the first step
    compile_s: float  # their seconds
    slowest: str  # the three slowest compilations
    precompiled: str  # what mdm_fast.engine.precompile did first

    def describe(self) -> str:
        return (f"{self.total:.1f} s = start-up {self.start_up:.1f} s + model build {self.build:.1f} s + first "
                f"forward {self.step:.1f} s (precompile: {self.precompiled}; then {self.compiles} Triton "
                f"compilations or cache loads in this process, {self.compile_s:.1f} s, slowest: {self.slowest})")


def time_to_first_step() -> FirstStep:
    """The first mdm_fast 256x256 forward (batch 2) of this process, timed from process start, with a
    cold Triton cache (main() points TRITON_CACHE_DIR at a fresh folder), its kernels precompiled in
    parallel first as the sampler and the trainer do."""
    from mdm_fast.engine import precompile

    t0 = time.time()
    fast = build("256x256", fast=True)
    t1 = time.time()
    seen = len(TRITON_COMPILES)
    step = forward_fn(fast, inputs(fast, 256, 2))
    stats = precompile(step)  # what mdm_fast's sampler and trainer do before their first step
    step()
    torch.cuda.synchronize()
    t2 = time.time()
    compiles = sorted(TRITON_COMPILES[seen:], key=lambda c: -c[1])
    slowest = ", ".join(f"{name} {sec:.1f} s" for name, sec, _ in compiles[:3]) or "-"
    return FirstStep(t2 - PROCESS_START, t0 - PROCESS_START, t1 - t0, t2 - t1, len(compiles),
                     sum(c[1] for c in compiles), slowest, str(stats))


def forward_flops_per_image(model, size: int) -> float:
    from mdm_fast.reference.summary import summarize

    return sum(level.flops for level in summarize(model, size))


def inputs(model, size: int, batch: int):
    x_t = [torch.randn(batch, 3, size // r, size // r, device="cuda") for r in model.resolution_ratios()]
    times = torch.randint(0, 1000, (batch,), device="cuda")
    cond = torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, device="cuda")
    mask = torch.ones(batch, TEXT_TOKENS, device="cuda")
    mask[:, TEXT_TOKENS // 2:] = 0
    return x_t, times, cond, mask


def _bf16_forward(model, *args):
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        return model(*args)


def forward_fn(model, args) -> Callable[[], object]:
    return lambda: _bf16_forward(model, *args)


def cast_once(model):
    """``model`` with its conv and linear weights cast to bf16 once, as mdm_fast's sampler runs it."""
    from mdm_fast.models import CastWeights

    return CastWeights(model, torch.bfloat16)


def graphed_forward_fn(model, args) -> Callable[[], object]:
    from mdm_fast.engine import GraphedCallable

    graphed = GraphedCallable(lambda *a: _bf16_forward(model, *a), clone_outputs=False)
    return lambda: graphed(*args)


def step_model(model):
    """What a train step calls: an mdm_fast model as the trainer runs it (:class:`CastEachCall`: its
    weights cast to bf16 by one multi-tensor copy per step, not per layer by autocast), else the model."""
    from mdm_fast.models import CastEachCall, is_fast

    return CastEachCall(model, model, torch.bfloat16) if is_fast(model) else model


def train_loss(model):
    call = step_model(model)

    def loss_fn(x_t, times, cond, mask, targets):
        with torch.autocast("cuda", torch.bfloat16):
            out = call(x_t, times, cond, mask)
        return sum(F.mse_loss(o.float(), t) for o, t in zip(out, targets))
    return loss_fn


def train_fn(model, args, graphed: bool) -> Callable[[], object]:
    from mdm_fast.engine import GraphedTrainStep

    targets = [torch.randn_like(x) for x in args[0]]
    loss_fn = train_loss(model)
    if graphed:
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-5, device="cuda"), capturable=True,
                                fused=True)
        step = GraphedTrainStep(model, opt, loss_fn)
        return lambda: step(*args, targets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*args, targets)
        loss.backward()
        opt.step()
        return loss
    return run


def trainer_step_fn(model, args) -> Callable[[], object]:
    """The step ``mdm-fast train`` runs on one GPU (:class:`mdm_fast.train.graphed_step.GraphedMicroSteps`):
    forward + backward replayed from a graph, the update (clip, fused AdamW, zero) eager, nothing read back."""
    from mdm_fast.train.graphed_step import GraphedMicroSteps

    device = args[0][0].device
    targets = [torch.randn_like(x) for x in args[0]]
    loss_fn = train_loss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step = GraphedMicroSteps(list(model.parameters()), opt, lambda *a: (loss_fn(*a), {}),
                             torch.Generator(device), accumulations=1, max_grad_norm=1.0,
                             capture=device.type == "cuda")

    def run():
        step.micro_step(*args, targets)
        return step.update()
    return run


@dataclass
class Result:
    workload: Workload
    variant: str
    ms: float
    peak_gb: float
    first_step_s: float


def measure(wl: Workload, variant: str, make: Callable[[], Callable[[], object]], iters: int,
            idle_bytes: int = 0) -> Result:
    """``idle_bytes``: memory held by what the variant does not use (the other model), not counted."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn = make()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = time_ms(fn, warmup=2, iters=iters)
    peak = (torch.cuda.max_memory_allocated() - idle_bytes) / 1e9
    print(f"{wl.model} {wl.kind} B={wl.batch} {variant}: {ms:.2f} ms, peak {peak:.1f} GB, first step {first:.1f} s",
          flush=True)
    return Result(wl, variant, ms, peak, first)


def variants(suite: str, ref, fast, wl: Workload, size: int) -> Dict[str, Callable[[], Callable[[], object]]]:
    """name -> a maker of the step function (built inside measure, so its set-up is timed)."""
    args = inputs(ref, size, wl.batch)
    out: Dict[str, Callable] = {}
    if wl.kind == "forward":
        out["reference eager"] = lambda: forward_fn(ref, args)
        if suite == "full":
            out["reference + torch.compile"] = lambda: forward_fn(torch.compile(ref), args)
        out["mdm_fast eager"] = lambda: forward_fn(fast, args)
        out["mdm_fast + CUDA graphs"] = lambda: graphed_forward_fn(fast, args)
        out["mdm_fast + CUDA graphs, weights cast once (the sampler's)"] = lambda: graphed_forward_fn(
            cast_once(fast), args)
        if suite == "full":
            out["mdm_fast + CUDA graphs, NCHW"] = lambda: graphed_forward_fn(nchw(fast), args)
            out["mdm_fast + torch.compile"] = lambda: forward_fn(torch.compile(fast), args)
    else:
        out["reference eager"] = lambda: train_fn(ref, args, graphed=False)
        if suite == "full":
            out["reference + torch.compile"] = lambda: train_fn(torch.compile(ref), args, graphed=False)
        out["mdm_fast eager"] = lambda: train_fn(fast, args, graphed=False)
        out["mdm_fast + CUDA graphs"] = lambda: train_fn(fast, args, graphed=True)
        out["mdm_fast trainer step (graphed fwd+bwd, eager update)"] = lambda: trainer_step_fn(fast, args)
        if suite == "full":
            out["mdm_fast + CUDA graphs, NCHW"] = lambda: train_fn(nchw(fast), args, graphed=True)
            out["mdm_fast + CUDA graphs, norm outputs kept"] = lambda: train_fn(norms_kept(fast), args, graphed=True)
    return out


def norms_kept(model):
    """A copy of ``model`` that keeps each norm's output for backward instead of recomputing it
    (``mdm_fast.models.set_norm_recompute``): the memory/time trade-off of the default, measured."""
    from mdm_fast.models import set_norm_recompute

    model = copy.deepcopy(model)
    set_norm_recompute(model, False)
    return model


def nchw(model):
    """A copy of ``model`` with its convolution weights NCHW instead of the default channels_last
    (``mdm_fast.models.set_channels_last``): what the layout choice is worth, measured."""
    from mdm_fast.models import set_channels_last

    model = copy.deepcopy(model)
    set_channels_last(model, False)
    return model


def run(suite: str, first_step: str, out_dir: Optional[Path]) -> None:
    """Every workload's variants; the table is rewritten after each workload, so a run cut short by a
    time limit still leaves what it measured."""
    from mdm_fast import optimize

    results: List[Result] = []
    flops: Dict[str, float] = {}
    for stem in ("256x256", "1024x1024"):
        wls = [w for w in QUICK if w.model == stem]
        t0 = time.perf_counter()
        ref = build(stem, fast=False)
        fast = optimize(copy.deepcopy(ref))
        print(f"built {stem} twice in {time.perf_counter() - t0:.1f} s", flush=True)
        size = public_config(stem)[2]
        flops[stem] = forward_flops_per_image(ref, size)
        for wl in wls:
            for name, make in variants(suite, ref, fast, wl, size).items():
                for model in (ref, fast):  # no gradients left over from an earlier variant
                    model.zero_grad(set_to_none=True)
                idle = fast if name.startswith("reference") else ref
                try:
                    results.append(measure(wl, name, make, iters=10 if wl.kind == "train" else 20,
                                           idle_bytes=_bytes(idle)))
                except Exception as e:  # a failing variant is reported, the others still run
                    print(f"{wl} {name} FAILED: {type(e).__name__}: {e}", flush=True)
            done = sum(1 for w in QUICK if any(r.workload == w for r in results))
            report(results, flops, first_step, out_dir, pending=len(QUICK) - done)
        del ref, fast
        gc.collect()
        torch.cuda.empty_cache()


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def report(results: List[Result], flops: Dict[str, float], first_step: str, out_dir: Optional[Path],
           pending: int = 0) -> None:
    peak = ceilings().bf16_tflops
    rows = []
    for r in results:
        wl = r.workload
        same = [x for x in results if x.workload == wl]
        base = next((x.ms for x in same if x.variant == "reference eager"), float("nan"))
        comp = next((x.ms for x in same if x.variant == "reference + torch.compile"), float("nan"))
        work = flops[wl.model] * wl.batch * (3 if wl.kind == "train" else 1)
        tf = work / r.ms / 1e9
        rows.append([f"{wl.model} {wl.kind} B={wl.batch}", r.variant, r.ms, base / r.ms, comp / r.ms, tf,
                     f"{100 * tf / peak:.0f}%", r.peak_gb, r.first_step_s])
    table = markdown_table(["workload", "variant", "ms", "x vs ref eager", "x vs ref compiled", "TFLOP/s", "MFU",
                            "peak GB", "first step s"], rows)
    notes = ("FLOPs: the forward FLOPs per image counted with torch's FlopCounterMode (610.6 GFLOP for 256x256, "
             "1040.1 for 1024x1024), x batch, x3 for a train step. MFU is against the bf16 matmul rate measured "
             "in this run. 'first step' is the wall time of the first call including set-up (graph capture, "
             "Triton compilation, torch.compile) after the model is built. '-' = not measured in this suite.\n\n"
             "Time from process start to the first mdm_fast step (256x256, batch 2, eager, no torch.compile, "
             f"cold Triton cache): {first_step}.")
    if pending:
        notes += f"\n\nPARTIAL: {pending} workload(s) not measured yet when this table was written."
    suite = "models-cudnn-benchmark" if torch.backends.cudnn.benchmark else "models"
    write_report(suite, {"Models": table, "Notes": notes}, out_dir, timing=WALL_TIMES, echo=not pending)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN's algorithm search on for the whole process (its own table)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.models needs a CUDA device")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mdm-fast-triton-")  # a first run's cold cache
    record_triton_compiles()
    try:
        first = time_to_first_step().describe()
    except Exception as e:  # reported, the side-by-side runs still go on
        first = f"FAILED: {type(e).__name__}: {e}"
    print(f"process start -> first mdm_fast step: {first}", flush=True)
    run(args.suite, first, args.out)


if __name__ == "__main__":
    main()
