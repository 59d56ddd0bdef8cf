"""Attention of the NestedUNet's inner levels: reference einsum vs SDPA pair vs fused Triton (vs flash_attn, xformers).

    python -m benchmarks.attention --suite quick|full [--out DIR]

Shapes are the public models' attention levels (the 64, 256 and 1024 models share them): level 1
is 32x32 = 1024 tokens, 512 channels, 8 heads of 64; level 2 is 16x16 = 256 tokens, 768 channels,
8 heads of 96; 128 text tokens, half of them masked, and the same unmasked: the public configs' inner
UNets set masked_cross_attention 0, so their blocks attend to every token. Sampling batch 32 (forward),
training batch 16 (forward and backward).

FLOPs counted: forward 4*B*L^2*C (self) + 4*B*L*T*C (cross, all T tokens, masked ones included);
backward 2.5x the forward (five matmuls of the same sizes instead of two; recomputation not
counted). TFLOP/s is compared with the bf16 matmul rate measured on the same card in the same run.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List

import torch

from benchmarks import common
from mdm_fast.ops import attention, attention_from_qkv

LEVELS = {  # name: (tokens L, channels C, heads)
    "level 1 (32x32, 512 ch, d=64)": (1024, 512, 8),
    "level 2 (16x16, 768 ch, d=96)": (256, 768, 8),
}
TEXT_TOKENS = 128


def _inputs(B: int, L: int, C: int, heads: int, dtype: torch.dtype, device="cuda") -> Dict[str, torch.Tensor]:
    d = C // heads
    qkv = torch.randn(B, 3 * C, L, device=device, dtype=dtype)  # the qkv conv output (NCHW model)
    qkv_cl = torch.randn(B, L, 3 * C, device=device, dtype=dtype).transpose(1, 2)  # channels_last model
    kv_cond = torch.randn(B, TEXT_TOKENS, 2 * C, device=device, dtype=dtype)  # the kv_cond Linear output
    mask = torch.zeros(B, TEXT_TOKENS, device=device, dtype=torch.bool)
    mask[:, : TEXT_TOKENS // 2] = True
    heads_first = dict(  # contiguous (B, heads, tokens, d), the layout SDPA prefers
        q=torch.randn(B, heads, L, d, device=device, dtype=dtype),
        k=torch.randn(B, heads, L, d, device=device, dtype=dtype),
        v=torch.randn(B, heads, L, d, device=device, dtype=dtype),
        k_cond=torch.randn(B, heads, TEXT_TOKENS, d, device=device, dtype=dtype),
        v_cond=torch.randn(B, heads, TEXT_TOKENS, d, device=device, dtype=dtype),
    )
    return dict(qkv=qkv, qkv_cl=qkv_cl, kv_cond=kv_cond, mask=mask, **heads_first)


def _variants(x: Dict[str, torch.Tensor], heads: int, suite: str,
              with_ref: bool) -> Dict[str, Callable[[], torch.Tensor]]:
    def heads_first(impl, mask="mask"):
        return lambda: attention(x["q"], x["k"], x["v"], x["k_cond"], x["v_cond"], x.get(mask), impl=impl)

    def from_qkv(impl, qkv="qkv", mask="mask"):
        return lambda: attention_from_qkv(x[qkv], x["kv_cond"], x.get(mask), heads, impl=impl)

    variants = {"SDPA pair (B,h,L,d)": heads_first("sdpa")}  # first: the baseline of the masked rows' ratios
    if with_ref:
        variants["reference einsum (public layout)"] = from_qkv("ref")
    if suite == "full":
        variants["SDPA pair (public layout)"] = from_qkv("sdpa")
        variants["triton fused (B,h,L,d)"] = heads_first("triton")
    variants["triton fused (public layout)"] = from_qkv("triton")
    variants["triton fused (channels_last layout)"] = from_qkv("triton", "qkv_cl")  # the default model's
    if suite == "full":
        variants["SDPA pair (channels_last layout)"] = from_qkv("sdpa", "qkv_cl")
    # the public configs' case: every text token kept (no mask at all); the baseline of the unmasked rows
    variants["SDPA pair (B,h,L,d), unmasked text"] = heads_first("sdpa", mask=None)
    variants["triton fused (channels_last layout), unmasked text"] = from_qkv("triton", "qkv_cl", mask=None)
    for package in ("flash_attn", "xformers"):  # when installed: the library's self branch, SDPA's masked text
        if importlib.util.find_spec(package) is not None:
            variants[f"{package} (B,h,L,d)"] = heads_first(package)
    return variants


def _leaves(x: Dict[str, torch.Tensor], name: str) -> List[torch.Tensor]:
    keys = {"public layout": ("qkv", "kv_cond"), "channels_last layout": ("qkv_cl", "kv_cond")}
    return [x[k] for k in next((v for layout, v in keys.items() if layout in name),
                               ("q", "k", "v", "k_cond", "v_cond"))]


def _time_backward(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], iters: int) -> float:
    for t in leaves:
        t.requires_grad_(True)
    out = fn()
    g = torch.randn_like(out)
    ms = common.device_ms(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True), iters=iters)
    for t in leaves:
        t.requires_grad_(False)
    return ms


HEADER = ["variant", "fwd ms", "fwd TFLOP/s", "fwd % bf16 mm", "fwd x vs SDPA pair",
          "bwd ms", "bwd TFLOP/s", "bwd % bf16 mm", "bwd x vs SDPA pair"]


def _section(title: str, level: str, B: int, dtype: torch.dtype, backward: bool, iters: int, suite: str,
             with_ref: bool) -> str:
    """Time every variant of one shape; each row is printed (flushed) as soon as it is measured."""
    L, C, heads = LEVELS[level]
    x = _inputs(B, L, C, heads, dtype)
    flops = 4 * B * L * L * C + 4 * B * L * TEXT_TOKENS * C
    ceiling = common.ceilings().bf16_tflops
    print(f"\n## {title}\n" + common.markdown_table(HEADER, []), flush=True)
    table, base = [], {}
    for name, fn in _variants(x, heads, suite, with_ref).items():
        fwd = common.device_ms(fn, iters=iters)
        bwd = _time_backward(fn, _leaves(x, name), iters) if backward else float("nan")
        if name.startswith("SDPA pair (B,h,L,d)"):  # the baseline of the rows with its text mask (or none)
            base[name.endswith("unmasked text")] = {"fwd": fwd, "bwd": bwd}
        ref = base[name.endswith("unmasked text")]
        tf_f, tf_b = common.tflops(flops, fwd), common.tflops(2.5 * flops, bwd)
        table.append([name, fwd, tf_f, 100 * tf_f / ceiling, ref["fwd"] / fwd,
                      bwd, tf_b, 100 * tf_b / ceiling, ref["bwd"] / bwd])
        print(common.markdown_table(HEADER, table[-1:]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    return common.markdown_table(HEADER, table)


def _picked_configs() -> str:
    """The config the autotuner picked per kernel and shape (2-4 candidates per head dim)."""
    from mdm_fast.kernels import attention as kernels

    picked = []
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        for key, config in getattr(getattr(kernels, name), "cache", {}).items():
            k = dict(zip(kernels.AUTOTUNE_KEY, key))  # Triton's key: these, in order, then the dtypes
            text = "no text" if not k["HAS_COND"] else "masked text" if k["HAS_CMASK"] else "unmasked text"
            layout = "head dim contiguous" if k["s_qd"] == 1 else "channel-major"
            picked.append(f"{name} LQ={k['LQ']}, d<={k['BLOCK_D']}, {text}, {layout}, "
                          f"B*H*LQ={k['lse_branch']}: {config}")
    return "; ".join(picked) or "none recorded"


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention needs a CUDA device")
    quick = args.suite == "quick"
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    iters = 20 if quick else 50
    c = common.ceilings()
    print(f"{common.card_name()}: bf16 matmul {c.bf16_tflops:.0f} TFLOP/s, copy {c.copy_gbps:.0f} GB/s", flush=True)
    sections = {}
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for i, level in enumerate(LEVELS):
            title = f"{level}, sampling batch 32, {dt}, forward"
            sections[title] = _section(title, level, 32, dtype, False, iters, args.suite,
                                       with_ref=not quick or i == 0)
            common.write_report("attention", sections, args.out, echo=False)  # kept if the run is cut
        for i, level in enumerate(LEVELS):
            if quick and i > 0:
                continue  # quick: forward + backward on level 1 only
            title = f"{level}, training batch 16, {dt}, forward + backward"
            sections[title] = _section(title, level, 16, dtype, True, iters, args.suite, with_ref=not quick)
            common.write_report("attention", sections, args.out, echo=False)
    sections["Notes"] = (__doc__.split("\n\n", 2)[2].strip()
                         + "\n\nSpeedups are relative to the SDPA pair on contiguous (B, h, L, d) tensors; "
                         "'public layout' variants read q, k, v from the qkv conv output (B, 3C, L) (NCHW "
                         "model; 'channels_last layout': the same with channels contiguous, what the default "
                         "channels_last model gives) and write (B, C, L) in that layout. Quick suite: "
                         "reference einsum on level 1 forward only, backward on level 1 only. Triton "
                         "configs picked: " + _picked_configs() + ".")
    common.write_report("attention", sections, args.out)


if __name__ == "__main__":
    main()
