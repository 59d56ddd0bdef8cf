"""Static checks of the Triton kernels compiled for sm_90 (H100/H200) at the model's shapes, on any machine.

``benchmarks.kernel_report`` compiles (without running) what the launchers would launch, with the real
specialisations, and reads registers, spills and global access widths from the cubin. These properties
decide a bandwidth-bound kernel's speed and can regress silently under the CPU interpreter:
  * no kernel spills registers to local memory;
  * every bf16 store of a group-norm / diffusion-step / concatenation output is a 16-byte vector (no
    2-byte stores), and channels_last group-norm tiles load 16-byte vectors (2-byte pieces only for the
    per-channel parameters);
  * the forward streaming kernels, and the channels_last kernels that reduce over rows, keep at least 16
    warps per SM (loads in flight);
  * the reductions over rows add no barrier to their loops (only the load pipeline's), and the row loops
    are pipelined.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ";".join(["(32,128,128,128)", "(32,768,16,16)", "(32,512,32,32) NHWC", "(8,32,1024,1024)", "256 model",
                  "+ moments"])


@pytest.fixture(scope="module")
def launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--ops",
                          "group_norm,diffusion_step,concat,bias_add", "--only", CASES, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 20, out.stdout[-2000:]
    return rows


def test_no_kernel_spills(launches):
    spilled = [(r["case"], r["kernel"], r["spill_bytes"]) for r in launches if r["spill_bytes"]]
    assert not spilled


def test_outputs_are_stored_in_16_byte_vectors(launches):
    """Every streamed bf16 output; the group norm backward's per-channel dscale and dshift (bf16 like the
    projections they flow to: one store each per program) may be 2-byte pieces."""
    def allowed(r):
        return 2 if r["case"].startswith("group_norm bwd") else 0

    narrow = [(r["case"], r["kernel"], r["stores"]) for r in launches if r["stores"].get("2", 0) > allowed(r)]
    assert not narrow


def test_channels_last_group_norm_loads_are_vectorised(launches):
    """The streamed rows load 16 bytes at a time. At most the five per-channel parameter vectors (weight,
    bias, scale, shift, input bias: one load each per program) may come in 2-byte pieces, where a
    program's channel vector spreads one channel per thread; the finalize launches read (parts x group)
    partials only."""
    rows = [r for r in launches if r["case"].startswith("group_norm") and "NHWC" in r["case"]
            and not r["kernel"].endswith("_finalize")]
    assert rows
    narrow = [(r["case"], r["kernel"], r["loads"]) for r in rows if r["loads"].get("2", 0) > 5]
    assert not narrow


def test_forward_streaming_kernels_keep_16_warps_per_sm(launches):
    """Two programs of 8 warps, each streaming 8192-element tiles (the H200 sweep's fastest forward,
    benchmarks/results/group_norm-sweep-nvidia-h200.md), keep as many bytes in flight per SM as three
    or four programs with 4096-element tiles; fewer resident warps leave the SM's load path idle."""
    looping = [r for r in launches if r["case"].startswith("group_norm fwd")
               and r["kernel"] in ("_fwd_partial", "_fwd_split_apply")
               or (r["kernel"] == "_fwd_fused" and "(32,128,128,128)" in r["case"] and "NHWC" not in r["case"])]
    assert looping
    low = [(r["case"], r["kernel"], r["regs"], r["per_sm"]) for r in looping if r["per_sm"] * r["num_warps"] < 16]
    assert not low


def test_channels_last_reducing_kernels_keep_16_warps_per_sm(launches):
    """The channels_last launches that reduce over rows (fused, statistics), forward and backward, under
    the plan's register cap: uncapped, the fused kernels at 512 channels x 32x32 (forward) and 768 x 16x16
    (backward) took 166-169 registers, one 8-warp program per SM, and the whole-row backward statistics at
    512 channels three 4-warp programs."""
    reducing = [r for r in launches if r["case"].startswith("group_norm") and "NHWC" in r["case"]
                and r["kernel"] in ("_fwd_fused", "_bwd_fused", "_fwd_partial", "_bwd_partial")]
    cases = {r["case"] for r in reducing}
    assert {"group_norm fwd (32,512,32,32) NHWC", "group_norm bwd (32,768,16,16) NHWC"} <= cases
    low = [(r["case"], r["kernel"], r["regs"], r["per_sm"]) for r in reducing if r["per_sm"] * r["num_warps"] < 16]
    assert not low


def test_reductions_over_rows_cross_no_warps_in_their_loops(launches):
    """The group-norm kernels that reduce over rows (fused, statistics; both layouts) and the
    concatenation with moments sum each tile into per-lane accumulators within threads
    (group_norm.LANE_ACCUMULATORS): their loops hold only the 2 barriers of Triton's load pipeline
    (PIPELINE_STAGES > 1). More means a lane's rows span threads (sizes.row_lanes no longer matches
    Triton's layout) and every tile crosses the warps again through shared memory (6 more barriers per
    forward tile, 9 per backward tile with a sum per tile)."""
    kernels = {"_fwd_fused", "_bwd_fused", "_fwd_partial", "_bwd_partial", "_concat_kernel"}
    reducing = [r for r in launches if r["kernel"] in kernels]
    assert {r["kernel"] for r in reducing} == kernels and any("NHWC" not in r["case"] for r in reducing)
    crossing = [(r["case"], r["kernel"], r["loop_barriers"]) for r in reducing if r["loop_barriers"] > 2]
    assert not crossing


def test_streaming_loops_are_pipelined(launches):
    """Every group-norm and concatenation row loop keeps the next tiles' loads in flight in shared
    memory (cp.async, PIPELINE_STAGES = 3: two 8192-element bf16 tiles, 32 KB, per 8-warp program),
    not in registers."""
    loops = [r for r in launches if r["kernel"] in ("_fwd_partial", "_bwd_partial", "_fwd_split_apply",
                                                      "_bwd_split_apply", "_concat_kernel")]
    assert loops
    unpipelined = [(r["case"], r["kernel"], r["shared"]) for r in loops if r["shared"] < 8 * 1024]
    assert not unpipelined
