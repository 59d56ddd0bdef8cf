"""Static report of the Triton kernels at the model's shapes, compiled for an H100/H200 on any machine.

    python -m benchmarks.kernel_report [--ops group_norm,attention,...] [--arch 90] [--out DIR]

No GPU is needed: a compile-only Triton driver (:class:`mdm_fast.engine.precompile.CompileOnlyDriver`)
targets sm_90, compiles every kernel our launchers would launch (with the same specialisations: pointer
alignment, integer divisibility, constexprs, every autotune config) and records the launch instead of
running it.
The cubin is read back with the ``cuobjdump`` that ships with Triton. Per kernel and shape:

- grid, warps, registers per thread, spill (local memory) bytes, shared memory;
- resident programs per SM (limited by registers, shared memory, threads) and waves over the SMs;
- the widths of the global loads and stores in the SASS (a 16-byte ``LDG.E.128`` is what a
  bandwidth-bound kernel wants; 2-byte accesses mean the compiler could not prove contiguity);
- the barriers (``BAR.SYNC``) per loop iteration (the most in one loop): a software pipeline's own
  (2 per loop for Triton's cp.async pipelining), a reduction across warps or a layout change through
  shared memory on every iteration (a streaming kernel's loop wants no more than its pipeline's);
- compile seconds (what the first step of a fresh process pays for that kernel).

What it cannot tell: achieved bandwidth or FLOP/s (a lent GPU and the ``benchmarks`` suites do).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# A compile-only report needs the real compiler, not the CPU interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.common import (TRITON_COMPILES, markdown_table, record_triton_compiles, revision,  # noqa: E402
                               write_atomic)
from mdm_fast.engine.precompile import CompileOnlyDriver  # noqa: E402

# H100/H200 (sm_90) limits per SM
SMS = 132
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
SMEM_PER_SM = 228 * 1024
MAX_SMEM_PER_BLOCK = 227 * 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@dataclass
class Binary:
    """What the cubin says about one compiled kernel."""

    regs: int
    spill_bytes: int
    loads: Counter = field(default_factory=Counter)  # access width in bytes -> count (LDG and cp.async)
    stores: Counter = field(default_factory=Counter)
    mma: str = "-"  # tensor-core instructions: "wgmma" (Hopper HGMMA), "mma" (HMMA), "-" none
    loop_barriers: int = 0  # the most BAR.SYNC instructions in one loop (each stalls the program's warps)


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _widths(sass: str, op: str) -> Counter:
    out: Counter = Counter()
    for m in re.finditer(rf"\b{op}\.E((?:\.[A-Z0-9]+)*)", sass):
        mods = m.group(1).split(".")[1:]
        width = next((_WIDTH[x] for x in mods if x in _WIDTH), 4)
        out[width] += 1
    return out


def _loop_barriers(sass: str) -> int:
    """The most BAR.SYNCs in one loop (between a backward branch's target and the branch)."""
    loops, barriers = [], []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(BRA|BAR\.SYNC)\S*\s*(?:`?\(?(0x[0-9a-f]+))?",
                         sass):
        addr = int(m.group(1), 16)
        if m.group(2) == "BAR.SYNC":
            barriers.append(addr)
        elif m.group(3) and int(m.group(3), 16) < addr:
            loops.append((int(m.group(3), 16), addr))
    return max((sum(lo <= a <= hi for a in barriers) for lo, hi in loops), default=0)


def inspect_cubin(cubin: bytes) -> Binary:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    mma = "wgmma" if "HGMMA" in sass else "mma" if "HMMA" in sass else "-"
    return Binary(regs, local, _widths(sass, "LDG") + _widths(sass, "LDGSTS"), _widths(sass, "STG"), mma,
                  _loop_barriers(sass))


@dataclass
class Launch:
    case: str
    kernel: str
    grid: Tuple[int, int, int]
    num_warps: int
    shared: int
    binary: Binary
    compile_s: float

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def per_sm(self) -> int:
        """Resident programs per SM: the tightest of registers, threads and shared memory."""
        regs_per_warp = -(-max(self.binary.regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        by_regs = REGS_PER_SM // (regs_per_warp * self.num_warps)
        by_threads = THREADS_PER_SM // (32 * self.num_warps)
        by_smem = SMEM_PER_SM // self.shared if self.shared else 32
        return max(0, min(by_regs, by_threads, by_smem, 32))

    @property
    def waves(self) -> float:
        return self.programs / max(1, self.per_sm * SMS)

    def summary(self) -> dict:
        b = self.binary
        return dict(case=self.case, kernel=self.kernel, grid=self.grid, num_warps=self.num_warps, regs=b.regs,
                    spill_bytes=b.spill_bytes, shared=self.shared, per_sm=self.per_sm, waves=self.waves,
                    loads={str(k): v for k, v in b.loads.items()}, stores={str(k): v for k, v in b.stores.items()},
                    mma=b.mma, loop_barriers=b.loop_barriers, compile_s=self.compile_s)


class _Recorder:
    """Collects launches; the launcher of every compiled kernel reports here instead of launching."""

    def __init__(self):
        self.case = ""
        self.launches: List[Launch] = []
        self.binaries: Dict[str, Binary] = {}
        self.compile_s: Dict[str, float] = {}
        self._seen: set = set()
        self._read = 0  # TRITON_COMPILES entries already inspected

    def record(self, name: str, metadata, grid) -> None:
        key = (self.case, name, tuple(grid), metadata.hash)
        if key in self._seen:  # the autotuner's repeated benchmark calls
            return
        self._seen.add(key)
        for _, seconds, kernel in TRITON_COMPILES[self._read:]:
            self._read += 1
            self.compile_s[kernel.metadata.hash] = seconds
            self.binaries[kernel.metadata.hash] = inspect_cubin(kernel.asm["cubin"])
        self.launches.append(Launch(self.case, name, tuple(grid), metadata.num_warps, metadata.shared,
                                    self.binaries[metadata.hash], self.compile_s.get(metadata.hash, 0.0)))


RECORDER = _Recorder()


def activate(arch: int = 90) -> None:
    """Route every later Triton launch in this process to the compile-only driver."""
    from triton.runtime import driver

    record_triton_compiles()
    driver.set_active(CompileOnlyDriver(arch, on_launch=RECORDER.record, max_shared_mem=MAX_SMEM_PER_BLOCK, sms=SMS))


# ---- the cases: the public models' shapes -------------------------------------------------------


def _empty(*shape, dtype=torch.bfloat16, channels_last=False):
    t = torch.empty(*shape, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def group_norm_cases():
    from benchmarks.group_norm import GROUPS, shapes
    from mdm_fast.kernels import group_norm as kern

    for b, c, p, cl in shapes("full"):
        x = _empty(b, c, p, p, channels_last=cl)
        w, bias, xb = (_empty(c, dtype=torch.float32) for _ in range(3))  # fp32 parameters, as the model's
        sc, sh = _empty(b, c), _empty(b, c)
        name = f"({b},{c},{p},{p}){' NHWC' if cl else ''}"  # as the ResNet's norm2: conv1's bias, scale-shift
        yield f"fwd {name}", lambda: kern.forward(x, w, bias, sc, sh, GROUPS, 1e-5, True, cl, None, xb)
        mean = torch.empty(b, GROUPS)
        yield f"bwd {name}", lambda: kern.backward(x, x, w, bias, sc, sh, mean, mean, GROUPS, True, cl, xb)


def attention_cases():
    from benchmarks.attention import LEVELS, TEXT_TOKENS
    from mdm_fast.kernels import attention as kern
    from mdm_fast.ops.attention import _kv_views, _out_view, _qkv_views

    # the text masked, and not (the public configs' inner UNets: masked_cross_attention 0)
    runs = itertools.product(LEVELS.items(), ((32, False), (16, True)), (False, True), (True, False))
    for (level, (L, C, h)), (batch, train), cl, masked in runs:
        def per_pixel(channels: int) -> torch.Tensor:  # (B, channels, L): the conv's layout, NCHW or NHWC
            return _empty(batch, L, channels).transpose(1, 2) if cl else _empty(batch, channels, L)

        q, k, v = _qkv_views(per_pixel(3 * C), h)
        kc, vc = _kv_views(_empty(batch, TEXT_TOKENS, 2 * C), h)
        mask = torch.empty(batch, TEXT_TOKENS, dtype=torch.bool) if masked else None
        out = _out_view(per_pixel(C), h)
        scale = (C // h) ** -0.5
        name = f"{level} B={batch}{' NHWC' if cl else ''}{'' if masked else ' unmasked'}"
        if not train:
            yield f"fwd {name}", lambda: kern.forward(q, k, v, kc, vc, mask, None, scale, out)
            continue
        lse = torch.empty(2, batch, h, L)
        yield f"bwd {name}", lambda: kern.backward(out, q, k, v, kc, vc, mask, None, out, lse, scale,
                                                   q, k, v, kc, vc)


def upsample_conv_cases():
    from benchmarks.resample import SAMPLING_BATCH, UPSAMPLE
    from mdm_fast.kernels import upsample_conv as kern

    for level, (c, p, _) in UPSAMPLE.items():
        x = _empty(SAMPLING_BATCH, c, p, p, channels_last=True)
        out = _empty(SAMPLING_BATCH, c, 2 * p, 2 * p, channels_last=True)
        pw = _empty(2, 2, 2, 2, c, c)
        yield f"{level} B={SAMPLING_BATCH} NHWC", lambda: kern.upsample_conv3x3_fwd(x, pw, _empty(c), out)


def diffusion_step_cases():
    from mdm_fast.kernels import diffusion_step as kern

    for name, b, size, ratios in (("256 model", 32, 256, [1, 4]), ("1024 model", 8, 1024, [1, 4, 16])):
        imgs = torch.empty(b, 3, size, size)
        noises = [torch.empty(b, 3, size // r, size // r) for r in ratios]
        g = torch.empty(len(ratios), b)
        scales = [1.0] * len(ratios)
        yield f"pyramid {name}", lambda: kern.noisy_pyramid(imgs, ratios, g, noises, scales, "eps")
        yield f"update {name}", lambda: kern.sampler_update(noises, noises, g, g, noises, scales, "eps", None,
                                                            "clip")


def bias_add_cases():
    from mdm_fast.kernels import bias_add as kern

    for cl in (False, True):  # the 256x256 model's outer ResNets at training batch 16, with the skip
        x, bias = _empty(16, 128, 256, 256, channels_last=cl), _empty(128, dtype=torch.float32)
        yield f"(16,128,256,256){' NHWC' if cl else ''} + skip", lambda: kern.bias_add(x, bias, x, cl)


def concat_cases():
    from mdm_fast.kernels import concat as kern
    from mdm_fast.kernels import group_norm as gn

    # the 256x256 model's decoder at sampling batch 32: its largest concatenation (128 + 64 channels, 6
    # per group), one at 64 px (its norm on whole rows, parts of 64 rows) and a deep one (768 + 512 at 32
    # px), with the moments of the norm that follows where that norm takes its split path
    for c1, c2, p in ((128, 64, 256), (512, 256, 64), (768, 512, 32)):
        a, b = _empty(32, c1, p, p, channels_last=True), _empty(32, c2, p, p, channels_last=True)
        plan = gn.moments_plan((32, c1 + c2, p, p), 32, torch.device("cuda", 0), 2)
        label = "+ moments" if plan is not None else "(its norm is fused: no moments)"
        yield f"(32,{c1}+{c2},{p},{p}) NHWC {label}", lambda: kern.concat(a, b, plan)


OPS = {"group_norm": group_norm_cases, "attention": attention_cases, "upsample_conv": upsample_conv_cases,
       "diffusion_step": diffusion_step_cases, "bias_add": bias_add_cases, "concat": concat_cases}


def run(ops: List[str], arch: int = 90, only: Sequence[str] = ()) -> List[Launch]:
    """Compile (not run) every kernel of ``ops`` at the model's shapes; ``only``: the cases whose name
    contains one of these strings (all when empty)."""
    activate(arch)
    RECORDER.launches.clear()
    for op in ops:
        for case, call in OPS[op]():
            if only and not any(o in f"{op} {case}" for o in only):
                continue
            RECORDER.case = f"{op} {case}"
            print(RECORDER.case, file=sys.stderr, flush=True)
            call()
    return list(RECORDER.launches)


def _fmt_widths(c: Counter) -> str:
    return " ".join(f"{w}B:{n}" for w, n in sorted(c.items(), reverse=True)) or "-"


def report(launches: List[Launch]) -> str:
    header = ["case", "kernel", "grid", "warps", "regs", "spill B", "smem KB", "per SM", "waves",
              "loads (width:count)", "stores", "barriers per loop", "tensor cores", "compile s"]
    rows = [[la.case, la.kernel, "x".join(map(str, la.grid)), la.num_warps, la.binary.regs, la.binary.spill_bytes,
             round(la.shared / 1024, 1), la.per_sm, round(la.waves, 2), _fmt_widths(la.binary.loads),
             _fmt_widths(la.binary.stores), la.binary.loop_barriers, la.binary.mma, round(la.compile_s, 2)]
            for la in launches]
    return markdown_table(header, rows)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {list(OPS)}")
    p.add_argument("--only", default="", help="';'-separated: only the cases whose name contains one of these")
    p.add_argument("--json", action="store_true", help="print one JSON object per launch instead of a table")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", type=Path, default=None, help="write kernel_report-sm<arch>.md here")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())  # cold: honest compile seconds
    launches = run(args.ops.split(","), args.arch, [o for o in args.only.split(";") if o])
    if args.json:
        for launch in launches:
            print(json.dumps(launch.summary()))
        return
    text = (f"# Triton kernels compiled for sm_{args.arch} (triton {triton.__version__}), static report\n\n"
            f"mdm_fast at {revision()}. Occupancy and waves assume {SMS} SMs (H100 SXM / H200). Compile "
            "seconds on this host.\n\n"
            + report(launches) + "\n")
    print(text)
    if args.out:
        write_atomic(args.out / f"kernel_report-sm{args.arch}.md", text)


if __name__ == "__main__":
    main()
