"""group_norm_act at the model's shapes: ref eager, torch.compile of the ref, triton, cuda; forward and backward.

    python -m benchmarks.group_norm --suite quick|full [--out DIR]
    python -m benchmarks.group_norm --sweep [--out DIR]     # the Triton plan's tile sizes, side by side

Shapes are the GroupNorm inputs of the public models (32 groups, bf16): the 256x256 model's outer levels
(64/128/256 channels at 256/128/64 px) and inner levels (256/512/768 channels at 64/32/16 px), the 1024x1024
model's outer levels (32/32/64 channels at 1024/512/256 px), at training batch (16 / 4) and sampling batch
(32 / 8). GB/s counts one read of x and one write of y (forward), reads of x and dy and one write of dx
(backward); "% copy" is that over the copy bandwidth measured in the same run. The quick suite times five
sampling-batch cases (both layouts only at 128 and 1024 px), an up-path concatenation of the 256x256 model
(192 channels at 128 px) and its 512-channel level (32 px), both channels_last, and compiles one case
(forward only); the full suite runs everything.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import ceilings, device_ms, gbps, knob, markdown_table, parser, write_report
from mdm_fast.ops import dispatch
from mdm_fast.ops.group_norm_act import OP, group_norm_act, reference

GROUPS = 32
M256_OUTER = [(64, 256), (128, 128), (256, 64)]  # (channels, pixels)
M256_INNER = [(256, 64), (512, 32), (768, 16)]
M1024_OUTER = [(32, 1024), (32, 512), (64, 256)]
# (batch, channels, pixels, channels_last): few cases, so that Triton compiles few kernels (< 40 s on an H200)
QUICK = [(32, 128, 128, False), (32, 128, 128, True), (32, 768, 16, False), (8, 32, 1024, False),
         (8, 32, 1024, True), (32, 192, 128, True),  # an up-path concatenation, 6 channels per group
         (32, 512, 32, True)]  # fused forward (its second pass in L2), whole-row backward
FAST = ("triton", "cuda")
DEVICE = "cuda"


def shapes(suite: str) -> List[Tuple[int, int, int, bool]]:
    if suite == "quick":
        return QUICK
    out = []
    for batch in (16, 32):
        out += [(batch, c, p) for c, p in M256_OUTER + M256_INNER[1:]]  # (256, 64) is in both levels
    for batch in (4, 8):
        out += [(batch, c, p) for c, p in M1024_OUTER]
    return [(b, c, p, cl) for b, c, p in out for cl in (False, True)]


def _inputs(b: int, c: int, p: int, channels_last: bool, scale_shift: bool):
    dev, dt = DEVICE, torch.bfloat16
    x = torch.randn(b, c, p, p, device=dev, dtype=dt)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, bias = torch.randn(c, device=dev), torch.randn(c, device=dev)  # fp32 parameters, as the model's
    sc = torch.randn(b, c, device=dev, dtype=dt) * 0.1 if scale_shift else None
    sh = torch.randn(b, c, device=dev, dtype=dt) if scale_shift else None
    return x, w, bias, sc, sh


def _fn(impl: str) -> Callable:
    if impl == "ref":
        return lambda *a: reference(*a)
    if impl == "compile":
        return torch.compile(lambda *a: reference(*a), dynamic=False)
    return lambda x, g, w, b, eps, sc, sh: group_norm_act(x, g, w, b, eps, sc, sh, impl=impl)


def _time_pair(impl: str, args, backward: bool = True) -> Tuple[float, float]:
    """(forward ms, backward ms); backward replays the autograd graph of one forward."""
    x, w, b, sc, sh = args
    if impl in ("ref", "compile"):  # F.group_norm outside autocast wants the parameters in x's dtype
        w, b = w.to(x.dtype), b.to(x.dtype)
    f = _fn(impl)
    with torch.no_grad():
        fwd = device_ms(lambda: f(x, GROUPS, w, b, 1e-5, sc, sh))
    if not backward:
        return fwd, float("nan")
    leaves = [t.requires_grad_() for t in (x, w, b, sc, sh) if t is not None]
    y = f(x, GROUPS, w, b, 1e-5, sc, sh)
    dy = torch.randn_like(y)
    bwd = device_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))
    for t in leaves:
        t.requires_grad_(False)
    return fwd, bwd


def _available(impl: str, args) -> Optional[str]:
    if impl in ("ref", "compile"):
        return None
    return dispatch.why_not(OP, impl, *args)


def run(suite: str, written: Callable[[Dict[str, str]], None] = lambda sections: None) -> Dict[str, str]:
    """The suite's sections; ``written(sections)`` after each one (a run cut by its time limit keeps them)."""
    copy = ceilings().copy_gbps
    compile_budget = 1 if suite == "quick" else math.inf
    sections: Dict[str, str] = {}
    notes: List[str] = []
    for scale_shift in ((True,) if suite == "quick" else (True, False)):
        rows = []
        for b, c, p, cl in shapes(suite):
            args = _inputs(b, c, p, cl, scale_shift)
            nbytes = args[0].numel() * args[0].element_size()
            ms: Dict[str, Tuple[float, float]] = {}
            for impl in ("ref", "compile") + FAST:
                if impl == "compile":
                    if compile_budget <= 0:
                        continue
                    compile_budget -= 1
                reason = _available(impl, args)
                if reason is not None:
                    notes.append(f"{impl}: {reason}")
                    continue
                ms[impl] = _time_pair(impl, args, backward=impl != "compile" or suite == "full")
            for d, name, traffic in ((0, "fwd", 2), (1, "bwd", 3)):
                t = {k: v[d] for k, v in ms.items()}
                nan = float("nan")
                row = [f"({b}, {c}, {p}, {p})", "NHWC" if cl else "NCHW", name]
                row += [t.get(k, nan) for k in ("ref", "compile") + FAST]
                for k in FAST:
                    bw = gbps(traffic * nbytes, t[k]) if k in t else nan
                    row += [bw, 100 * bw / copy]
                best = min((t[k] for k in FAST if k in t), default=nan)
                row.append(t["ref"] / best)
                rows.append(row)
            del args
            torch.cuda.empty_cache()
        header = ["shape", "layout", "pass", "ref ms", "compile ms", "triton ms", "cuda ms", "triton GB/s",
                  "triton % copy", "cuda GB/s", "cuda % copy", "ref / best fast"]
        title = "act(group_norm(x) * (1 + scale) + shift), bf16" if scale_shift else "act(group_norm(x)), bf16"
        sections[title] = markdown_table(header, rows)
        written(sections)
    sections["The decoder's concatenation + norm1 (forward, bf16, channels_last, scale-shift + SiLU)"] = decoder(
        suite, copy)
    if notes:
        sections["Backends skipped"] = "\n".join(f"- {n}" for n in sorted(set(notes)))
    return sections


# (batch, channels of x, channels of the skip, pixels): the 256x256 model's largest concatenation (6 channels
# per group), one at 64 px (its norm's parts of 64 rows) and a deep one, at sampling batch 32
DECODER = [(32, 128, 64, 256), (32, 512, 256, 64), (32, 768, 512, 32)]


def decoder(suite: str, copy_gbps: float) -> str:
    """What the up path runs before each ResNet: torch.cat then the norm (the public order), the Triton
    row copy then the norm, and the copy handing the norm its partial moments (the fast model's way)."""
    from mdm_fast.ops import concat_channels, concat_channels_for_norm

    rows = []
    for b, c1, c2, p in DECODER[:1] if suite == "quick" else DECODER:
        cl = torch.channels_last
        x = torch.randn(b, c1, p, p, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=cl)
        skip = torch.randn(b, c2, p, p, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=cl)
        _, w, bias, sc, sh = _inputs(1, c1 + c2, 1, False, True)
        sc, sh = sc.expand(b, -1).contiguous(), sh.expand(b, -1).contiguous()

        def norm(h, moments=None):
            return group_norm_act(h, GROUPS, w, bias, 1e-5, sc, sh, impl="triton", moments=moments)

        variants = {"torch.cat + norm": lambda: norm(torch.cat((x, skip), 1)),
                    "concat + norm": lambda: norm(concat_channels(x, skip, impl="triton")),
                    "concat with moments + norm": lambda: norm(*concat_channels_for_norm(x, skip, GROUPS, "triton")),
                    "torch.cat alone": lambda: torch.cat((x, skip), 1),
                    "concat alone": lambda: concat_channels(x, skip, impl="triton"),
                    "concat with moments alone": lambda: concat_channels_for_norm(x, skip, GROUPS, "triton")}
        nbytes = 2 * b * (c1 + c2) * p * p * 2  # the concatenation read + written once (bf16)
        with torch.no_grad():
            for name, fn in variants.items():
                ms = device_ms(fn)
                traffic = nbytes if "alone" in name else 2 * nbytes  # + the norm's read and write
                rows.append([f"({b}, {c1}+{c2}, {p}, {p})", name, ms, 100 * gbps(traffic, ms) / copy_gbps])
    return markdown_table(["shape", "variant", "ms", "% copy (minimal traffic)"], rows)


# (name, module constant, values): the knobs of mdm_fast.kernels.group_norm.plan, the first value the default
SWEEP = [("TILE_FWD", "TILE_FWD", (8192, 4096, 16384)), ("TILE_BWD", "TILE_BWD", (2048, 1024, 4096)),
         ("SINGLE_TILE", "SINGLE_TILE", (8192, 4096, 16384)),
         ("split programs / SM", "SPLIT_PROGRAMS_PER_SM", (16, 4, 32)),
         ("NHWC min channels / program", "NHWC_MIN_CHANNELS", (32, 64, 128)),
         # 1000: the split path wherever a program's groups hold more than SPLIT_MIN_ELEMENTS elements
         ("fused min programs / SM", "FUSED_MIN_PROGRAMS_PER_SM", (2, 1000)),
         # 2**62: never whole rows (channels_last takes the fused path or the split path over GPB groups)
         ("NHWC whole rows from elements", "NHWC_WHOLE_ROWS_ELEMENTS", (1 << 22, 1 << 62)),
         # 2**30: whole rows for every split plan of GPB groups too (C/G a power of two: 32-channel rows)
         ("whole rows under channels / program", "WHOLE_ROWS_BELOW_CHANNELS", (32, 1 << 30)),
         # the L2 budget of a fused second pass, under which channels_last stays fused: 0 never, 2**40 always
         ("fused L2 bytes", "FUSED_L2_BYTES", (24 << 20, 0, 1 << 40)),
         ("whole-row part min rows", "WHOLE_ROWS_MIN_ROWS", (64, 16, 256)),
         # None: the compiler's register choice for the fused and statistics launches
         ("max registers / thread", "MAX_REGISTERS", (128, None)),
         # False: reductions over rows summed per tile, across the warps (the design before)
         ("lane accumulators", "LANE_ACCUMULATORS", (True, False)),
         # 1: no pipelining (each tile awaited before its work); 2: one tile in flight, as the register
         # prefetch before; 4: three
         ("pipeline stages", "PIPELINE_STAGES", (3, 1, 2, 4))]
NHWC_ONLY = {"NHWC_MIN_CHANNELS", "NHWC_WHOLE_ROWS_ELEMENTS", "WHOLE_ROWS_BELOW_CHANNELS", "FUSED_L2_BYTES",
             "WHOLE_ROWS_MIN_ROWS", "MAX_REGISTERS"}


def _plans(kern, b: int, c: int, p: int, cl: bool):
    """The (forward, backward) plans the op makes for this shape on this GPU under the current knobs."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return tuple(kern.plan(b, c, p * p, GROUPS, cl, sms, backward) for backward in (False, True))


def sweep(out_dir, knobs: Optional[Sequence[str]] = None) -> None:
    """Triton fwd/bwd ms of the quick shapes for each value of each plan knob (one knob at a time; only
    the module constants named in ``knobs`` if given); a value that plans this shape as the default does
    is not timed again. The table is written after each shape, so a run cut short keeps what it
    measured."""
    from mdm_fast.kernels import group_norm as kern

    copy = ceilings().copy_gbps
    rows = []
    header = ["shape", "layout", "plan knob", "fwd ms", "bwd ms", "fwd % copy", "bwd % copy"]
    for b, c, p, cl in QUICK:
        args = _inputs(b, c, p, cl, True)
        nbytes = args[0].numel() * args[0].element_size()
        default = _plans(kern, b, c, p, cl)
        for label, attr, values in SWEEP:
            if knobs and attr not in knobs or attr in NHWC_ONLY and not cl:
                continue
            for k, value in enumerate(values):
                with knob(kern, attr, value):
                    if k and _plans(kern, b, c, p, cl) == default:
                        continue
                    fwd, bwd = _time_pair("triton", args)
                rows.append([f"({b}, {c}, {p}, {p})", "NHWC" if cl else "NCHW", f"{label} = {value}", fwd, bwd,
                             100 * gbps(2 * nbytes, fwd) / copy, 100 * gbps(3 * nbytes, bwd) / copy])
        del args
        torch.cuda.empty_cache()
        write_report("group_norm-sweep", {
            "Triton plan sweep, bf16, scale-shift + SiLU (first row of each knob: the default; values that "
            "plan a shape as the default does are left out)": markdown_table(header, rows)}, out_dir, echo=False)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="time the Triton plan's knobs instead of the backends")
    p.add_argument("--knobs", default="", help="with --sweep: only these comma-separated knobs (module constants "
                                               f"of mdm_fast.kernels.group_norm: {', '.join(k[1] for k in SWEEP)})")
    args = p.parse_args()
    knobs = [k for k in args.knobs.split(",") if k]
    unknown = set(knobs) - {k[1] for k in SWEEP}
    if unknown:
        raise SystemExit(f"--knobs: unknown {sorted(unknown)}; the knobs are {[k[1] for k in SWEEP]}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.group_norm needs a CUDA device")
    if args.sweep:
        sweep(args.out, knobs)
        return
    name = f"group_norm-{args.suite}"
    sections = run(args.suite, lambda done: write_report(name, done, args.out, echo=False))
    write_report(name, sections, args.out)


if __name__ == "__main__":
    main()
