"""mdm_fast.ops.attention: self + masked cross attention, every backend against an fp64 oracle.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (fp32 and fp16 dots only: the interpreter
computes bf16 dots wrongly) at tiny odd shapes so every tile has tails. GPU tests (marked) bound
each backend's error by twice PyTorch's own low-precision error, as flash-attention's tests do.
"""
import math
import sys

import pytest
import torch

from mdm_fast.ops import BackendUnavailable, attention, attention_from_qkv, use_impl
from mdm_fast.ops import dispatch

BACKENDS = ("triton", "sdpa", "ref")
# (forward, backward) absolute = relative tolerance vs the fp64 oracle on the same rounded inputs
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (3e-2, 1e-1)}


def oracle_branch(q, k, v, keep, scale):
    """fp64 softmax(q k^T * scale) v with masked keys; all-masked rows give 0 (finite gradients)."""
    s = torch.einsum("bhld,bhsd->bhls", q.double(), k.double()) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True))  # (B, H, L, S); shift by unmasked max: exact softmax
    if keep is not None:
        e = e * (keep != 0)[:, None, None, :]
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhls,bhsd->bhld", p, v.double())


def oracle(q, k, v, kc=None, vc=None, cond_mask=None, scale=None, self_mask=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = oracle_branch(q, k, v, self_mask, scale)
    if kc is not None:
        out = out + oracle_branch(q, kc, vc, cond_mask, scale)
    return out


def make_inputs(B, H, L, T, d, dtype, device="cpu", S=None):
    q, k, v = (torch.randn(B, H, n, d, device=device).to(dtype) for n in (L, S or L, S or L))
    kc, vc = (torch.randn(B, H, T, d, device=device).to(dtype) for _ in range(2)) if T else (None, None)
    return q, k, v, kc, vc


def padded_mask(B, T, device="cpu", all_masked=None):
    """(B, T) float mask: batch i keeps its first T - i tokens; batch ``all_masked`` keeps none."""
    m = (torch.arange(T, device=device)[None, :] < (T - torch.arange(B, device=device))[:, None]).float()
    if all_masked is not None:
        m[all_masked] = 0
    return m


def grads(out, tensors, g):
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, present, g)


def check_against_oracle(impl, q, k, v, kc, vc, mask, scale=None, self_mask=None):
    tol_f, tol_b = TOL[q.dtype]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, kc, vc)]
    out = attention(*leaves, cond_mask=mask, scale=scale, impl=impl, self_mask=self_mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, kc, vc)]
    ref = oracle(*ref_leaves, cond_mask=mask, scale=scale, self_mask=self_mask)
    torch.testing.assert_close(out.double(), ref, atol=tol_f, rtol=tol_f)
    g = torch.randn_like(ref)
    for got, want in zip(grads(out, leaves, g.to(out.dtype)), grads(ref, ref_leaves, g)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=tol_b * max(1.0, want.abs().max().item()), rtol=tol_b)


CASES = {
    # name: (B, H, L, T, mask kind)
    "odd-padded": (2, 2, 37, 5, "padded"),
    "fully-masked-row": (2, 1, 19, 7, "all"),
    "batch-one": (1, 2, 17, 3, None),
    "no-text": (2, 1, 21, 0, None),
}


def _mask_for(kind, B, T):
    if kind is None:
        return None
    return padded_mask(B, T, all_masked=1 if kind == "all" else None)


# fp16 only through the kernel here: CPU fp16 matmuls of the PyTorch backends are not what runs on a GPU
ORACLE_RUNS = [(impl, dtype, d) for impl in BACKENDS for dtype, d in [(torch.float32, 16), (torch.float32, 96)]]
ORACLE_RUNS += [("triton", torch.float16, 64), ("triton", torch.float16, 96)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl,dtype,d", ORACLE_RUNS)
def test_matches_oracle(impl, dtype, d, case):
    B, H, L, T, kind = CASES[case]
    check_against_oracle(impl, *make_inputs(B, H, L, T, d, dtype), _mask_for(kind, B, T))


def test_bf16_torch_backends_cpu():
    # bf16 through the PyTorch backends on CPU (the interpreter cannot do bf16 dots)
    inputs = make_inputs(2, 2, 13, 5, 32, torch.bfloat16)
    for impl in ("ref", "sdpa"):
        check_against_oracle(impl, *inputs, padded_mask(2, 5))


@pytest.mark.parametrize("impl", BACKENDS)
def test_head_dim_64_cross_lengths_and_scale(impl):
    # keys longer than queries, a custom scale, int mask whose first key block (16 wide under the
    # interpreter) is entirely masked and second partly kept (a negative value keeps too: nonzero = keep):
    # the kernels skip the first block
    q, k, v, kc, vc = make_inputs(1, 2, 9, 20, 64, torch.float32, S=23)
    mask = torch.zeros(1, 20, dtype=torch.int64)
    mask[:, 17:19] = torch.tensor([1, -2])
    check_against_oracle(impl, q, k, v, kc, vc, mask, scale=0.3)


@pytest.mark.parametrize("impl", BACKENDS)
def test_logits_far_from_zero(impl):
    """Scores of +-120 (exp of -120 underflows fp32): the online softmax must rescale by its running max both
    when a later key tile's max is lower and when it is higher (sample 0: head 0's self keys are +120 in the
    first 16-key tile and -120 after, its text -120 then +120; head 1 the other way round), and a row whose
    every score is -120 (sample 1) must not underflow to "no keys" (a softmax started from a max of 0 would).
    Forward against the oracle; the gradients only finite (dq's shifted channel is 120 * a sum that cancels
    to 0, so its fp32 error is ~120 times the usual)."""
    B, H, L, T, d = 2, 2, 37, 20, 16
    q, k, v, kc, vc = make_inputs(B, H, L, T, d, torch.float32)
    q[..., 0] = 1.0  # score = 120 * sign + the other 15 channels' dot (scale 1)
    k[..., 0], kc[..., 0] = -120.0, -120.0
    k[0, 0, :16, 0], k[0, 1, 16:, 0] = 120.0, 120.0  # (B, H, L, d): first tile high, then low; then the reverse
    kc[0, 0, 16:, 0], kc[0, 1, :16, 0] = 120.0, 120.0
    leaves = [t.requires_grad_() for t in (q, k, v, kc, vc)]
    out = attention(*leaves, cond_mask=padded_mask(B, T), scale=1.0, impl=impl)
    want = oracle(q.detach(), k.detach(), v.detach(), kc.detach(), vc.detach(), padded_mask(B, T), scale=1.0)
    torch.testing.assert_close(out.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][0])
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), leaves))


def test_forward_op_lse_per_branch():
    """The forward op's second output, the backward's statistics (2, B, H, L): per branch the base-2
    log-sum-exp of the kept keys' scores, +inf where the branch has no key (no text, all text masked, or
    all self keys masked)."""
    B, H, L, T, d = 2, 2, 19, 7, 16
    q, k, v, kc, vc = make_inputs(B, H, L, T, d, torch.float32)
    cond_mask = padded_mask(B, T, all_masked=1) != 0  # (B, T): sample 1 keeps no text
    self_mask = torch.ones(B, L, dtype=torch.bool)
    self_mask[0] = False  # (B, L): sample 0 keeps no pixel key

    def lse2(keys, keep):  # (B, H, L) fp64, base 2; -inf where nothing is kept
        s = torch.einsum("bhld,bhsd->bhls", q.double(), keys.double()) * 0.25
        return torch.logsumexp(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1) / math.log(2)

    _, lse = torch.ops.mdm_fast.attention_fwd(q, k, v, kc, vc, cond_mask, self_mask, 0.25)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    torch.testing.assert_close(lse[0].double(), lse2(k, self_mask).where(self_mask.any(-1)[:, None, None], inf))
    torch.testing.assert_close(lse[1].double(), lse2(kc, cond_mask).where(cond_mask.any(-1)[:, None, None], inf))
    _, lse = torch.ops.mdm_fast.attention_fwd(q, k, v, None, None, None, None, 0.25)  # no text branch
    torch.testing.assert_close(lse[0].double(), lse2(k, torch.ones(B, L, dtype=torch.bool)))
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()


def test_fully_masked_row_is_zero_and_grads_finite():
    q, k, v, kc, vc = make_inputs(2, 2, 11, 4, 16, torch.float32)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    kc, vc = kc.requires_grad_(), vc.requires_grad_()
    for impl in BACKENDS:
        out = attention(q, k, v, kc, vc, mask, impl=impl)
        self_only = attention(q, k, v, impl=impl)
        torch.testing.assert_close(out[1], self_only[1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[0], self_only[0])
        dkc, dvc = torch.autograd.grad(out.sum(), (kc, vc))
        assert torch.isfinite(dkc).all() and torch.isfinite(dvc).all()
        assert dkc[1].abs().max() == 0 and dvc[1].abs().max() == 0  # batch 1 has no text influence
        assert dvc[0, :, 1].abs().max() == 0  # a masked key gets no gradient


@pytest.mark.parametrize("impl", BACKENDS)
def test_all_self_keys_masked_leaves_the_text_branch(impl):
    """A sample whose self keys are all masked gets the text branch alone (zero from the self branch,
    not NaN), finite gradients and none to its masked keys; the other sample is untouched."""
    B, H, L, T, d = 2, 2, 19, 7, 16
    q, k, v, kc, vc = (t.requires_grad_() for t in make_inputs(B, H, L, T, d, torch.float32))
    self_mask = torch.ones(B, L, dtype=torch.bool)
    self_mask[0] = False  # (B, L): sample 0 keeps no pixel key
    out = attention(q, k, v, kc, vc, padded_mask(B, T), self_mask=self_mask, impl=impl)
    text_only = oracle_branch(q, kc, vc, padded_mask(B, T), 1 / math.sqrt(d))
    torch.testing.assert_close(out[0].double(), text_only[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), oracle(q, k, v, kc, vc, padded_mask(B, T), self_mask=self_mask),
                               atol=2e-5, rtol=2e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert dk[0].abs().max() == 0 and dv[0].abs().max() == 0


@pytest.mark.parametrize("impl", BACKENDS)
def test_expanded_and_strided_masks(impl):
    """Bool masks with stride 0 (one row expanded over the batch) or a column stride (a slice) give what
    their contiguous copies give, for the text and the self keys."""
    B, H, L, T, d = 2, 2, 13, 9, 16
    q, k, v, kc, vc = make_inputs(B, H, L, T, d, torch.float32)
    row = torch.tensor([True, False, True, True, False, True, False, True, True])  # (T,)
    wide = torch.rand(B, 2 * L) > 0.4
    wide[:, 0] = True  # a kept key per sample
    for cond_mask, self_mask in ((row.expand(B, T), None), (None, wide[:, ::2]), (row.expand(B, T), wide[:, ::2])):
        masks = {"cond_mask": cond_mask if cond_mask is not None else torch.ones(B, T, dtype=torch.bool),
                 "self_mask": self_mask}
        got = attention(q, k, v, kc, vc, impl=impl, **masks)
        dense = {n: None if m is None else m.contiguous() for n, m in masks.items()}
        assert all(m is None or m.is_contiguous() for m in dense.values())
        torch.testing.assert_close(got, attention(q, k, v, kc, vc, impl=impl, **dense), atol=1e-6, rtol=1e-6)


def _public_attention(q, k, v, heads, mask=None):
    """The public SelfAttention.attention on (B, C, L) tensors (its formula, for the layout test)."""
    bs, width, length = q.shape
    ch = width // heads
    s = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", (q * s).reshape(bs * heads, ch, length), (k * s).reshape(bs * heads, ch, -1))
    if mask is not None:
        w = w.masked_fill(mask.view(bs, 1, 1, -1).repeat(1, heads, 1, 1).flatten(0, 1) == 0, float("-inf"))
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v.reshape(bs * heads, ch, -1)).reshape(bs, -1, length)


def _public_block(qkv, kv_lin, mask, heads):
    """SelfAttention.forward's attention part from the qkv conv (B, 3C, L) and kv_cond Linear (B, T, 2C)."""
    q, k, v = qkv.chunk(3, dim=1)
    h = _public_attention(q, k, v, heads)
    if kv_lin is not None:
        k_cond, v_cond = kv_lin.transpose(-2, -1).chunk(2, dim=1)
        h = h + _public_attention(q, k_cond, v_cond, heads, mask)
    return h


@pytest.mark.parametrize("token_major", [False, True], ids=["channel-major", "token-major"])
@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize("impl", BACKENDS)
def test_layout_fused_matches_public_block(impl, with_text, token_major):
    B, heads, d, L, T = 2, 2, 16, 15, 6
    C = heads * d
    qkv = torch.randn(B, 3 * C, L, dtype=torch.float64).requires_grad_()
    kv_lin = torch.randn(B, T, 2 * C, dtype=torch.float64).requires_grad_() if with_text else None
    mask = padded_mask(B, T) if with_text else None
    want = _public_block(qkv, kv_lin, mask, heads)
    leaves = [qkv] + ([kv_lin] if with_text else [])
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, g)
    x = [t.detach().float() for t in leaves]
    if token_major:  # what the qkv conv gives in a channels_last model: (B, 3C, L) with channels contiguous
        x[0] = x[0].transpose(1, 2).contiguous().transpose(1, 2)
    x = [t.requires_grad_() for t in x]
    out = attention_from_qkv(x[0], x[1] if with_text else None, mask, heads, impl=impl)
    assert out.shape == (B, C, L)
    assert out.is_contiguous() if not token_major else out.transpose(1, 2).is_contiguous()  # qkv's layout
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for got, w in zip(torch.autograd.grad(out, x, g.float()), want_grads):
        assert got.shape == w.shape
        torch.testing.assert_close(got.double(), w, atol=1e-4, rtol=1e-4)


def test_layout_fused_equals_attention_on_views():
    B, heads, d, L, T = 1, 3, 16, 10, 4
    C = heads * d
    qkv = torch.randn(B, 3 * C, L)
    kv_lin = torch.randn(B, T, 2 * C)
    mask = torch.tensor([[1, 1, 0, 1]])
    q, k, v = (t.reshape(B, heads, d, L).transpose(2, 3) for t in qkv.chunk(3, dim=1))
    kc, vc = (t.reshape(B, T, heads, d).transpose(1, 2) for t in kv_lin.chunk(2, dim=-1))
    want = attention(q, k, v, kc, vc, mask, impl="triton")  # strided views straight into the op
    got = attention_from_qkv(qkv, kv_lin, mask, heads, impl="triton")
    torch.testing.assert_close(got, want.transpose(2, 3).reshape(B, C, L), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_1d_attention_with_key_mask(impl):
    """SelfAttention1D (LM head / temporal blocks): (B, L, heads*d), key mask on the self branch."""
    B, L, heads, d = 2, 9, 2, 16
    x = torch.randn(B, L, 3 * heads * d, dtype=torch.float64)
    mask = padded_mask(B, L)
    q, k, v = x.chunk(3, dim=-1)
    s = 1 / math.sqrt(math.sqrt(d))
    w = torch.einsum("bthc,bshc->bhts", q.reshape(B, L, heads, d) * s, k.reshape(B, L, heads, d) * s)
    w = torch.softmax(w.masked_fill(mask.view(B, 1, 1, L) == 0, float("-inf")), dim=-1)
    want = torch.einsum("bhts,bshc->bthc", w, v.reshape(B, L, heads, d)).reshape(B, L, -1)
    qh, kh, vh = (t.float().reshape(B, L, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d) views
    got = attention(qh, kh, vh, self_mask=mask, impl=impl).transpose(1, 2).reshape(B, L, -1)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl,dtype", [("triton", torch.float32), ("triton", torch.float16), ("ref", torch.float32),
                                        ("sdpa", torch.float32)])
def test_self_mask_matches_oracle_forward_and_gradients(impl, dtype):
    """A key mask on the self branch over several key tiles (16 wide under the interpreter), with a text
    branch: forward and every gradient. Sample 0 keeps every other key (partly kept full tiles and tail);
    sample 1 masks its whole first tile (skipped) and part of the second. (test_1d_attention_with_key_mask
    has 9 keys, one tail tile, and checks the forward only.)"""
    B, H, L, T, d = 2, 2, 37, 5, 16
    self_mask = torch.ones(B, L)
    self_mask[0, 1::2] = 0
    self_mask[1, :16] = 0
    self_mask[1, 20:27] = 0
    check_against_oracle(impl, *make_inputs(B, H, L, T, d, dtype), padded_mask(B, T), self_mask=self_mask)


def test_autotuning_is_per_batch():
    """The kernels' configs are timed per batch too: a choice made at batch 32 is not reused at batch 2."""
    from mdm_fast.kernels import attention as kernels

    for kernel in (kernels._fwd_kernel, kernels._bwd_dq_kernel, kernels._bwd_dkdv_kernel):
        assert kernel.keys == kernels.AUTOTUNE_KEY
    q, k = torch.empty(2, 8, 256, 64), torch.empty(2, 8, 256, 64)
    keys = [tuple(kernels._common(q[:b], k[:b], None, None, None)[n] for n in kernels.AUTOTUNE_KEY
                  if n in ("LQ", "LK", "T_BUCKET", "lse_branch")) for b in (1, 2)]
    assert keys[0] != keys[1]


def test_autotuning_shares_a_choice_between_near_text_lengths():
    """Captions padded to their batch's longest give each batch its own text length T: the autotuner
    times its candidates once per power-of-two bucket of T, not once per T (nor for a run without text)."""
    from mdm_fast.kernels import attention as kernels

    q, k = torch.empty(2, 8, 256, 64), torch.empty(2, 8, 256, 64)

    def key(T):
        kc = torch.empty(2, 8, T, 64) if T else None
        args = dict(kernels._common(q, k, kc, None, None), s_qd=q.stride(3))
        return tuple(args[n] for n in kernels.AUTOTUNE_KEY), args["T"]

    assert "T" not in kernels.AUTOTUNE_KEY
    (k77, t77), (k100, t100), (k128, _), (k129, _) = key(77), key(100), key(128), key(129)
    assert k77 == k100 == k128 and (t77, t100) == (77, 100)  # the kernel still gets the exact length
    assert k128 != k129 != key(0)[0] and key(1)[0] == key(16)[0] != key(17)[0]


def test_a_second_derivative_raises_on_the_kernel_backend():
    """create_graph=True through the triton backward (kernels, no graph): an error naming the op, where the
    second-derivative term was silently missing."""
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, impl="triton")
    g, = torch.autograd.grad((out * torch.randn_like(out)).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="Attention: no second derivative"):
        torch.autograd.grad((g ** 2).sum(), q)


def test_opcheck_custom_ops():
    q, k, v, kc, vc = (t.requires_grad_() for t in make_inputs(1, 2, 5, 3, 16, torch.float16))
    q = torch.randn(1, 5, 2, 16, dtype=torch.float16).transpose(1, 2).requires_grad_()  # (B, H, L, d) strided view
    mask = torch.tensor([[True, False, True]])
    torch.library.opcheck(torch.ops.mdm_fast.attention_fwd.default, (q, k, v, kc, vc, mask, None, 0.25))
    self_mask = torch.tensor([[True, False, True, True, False]])  # over the 5 pixel keys
    torch.library.opcheck(torch.ops.mdm_fast.attention_fwd.default, (q, k, v, None, None, None, self_mask, 0.25))
    qkv = torch.randn(1, 3 * 32, 6, requires_grad=True)
    kv = torch.randn(1, 3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.mdm_fast.attention_qkv_fwd.default, (qkv, kv, mask, 2, 0.25))


# ---- dispatch and validation -------------------------------------------------------------------


def test_dispatch_rules(monkeypatch):
    q, k, v, kc, vc = make_inputs(1, 1, 4, 2, 16, torch.float32)
    assert dispatch.resolve("attention", "auto", q, k, v, kc, vc) == "sdpa"  # the interpreter only by name
    assert dispatch.resolve("attention", "triton", q, k, v, kc, vc) == "triton"
    with use_impl("sdpa"):
        assert dispatch.resolve("attention", "auto", q, k, v, kc, vc) == "sdpa"
    monkeypatch.setenv("MDM_FAST_IMPL", "ref")
    assert dispatch.resolve("attention", "auto", q, k, v, kc, vc) == "ref"
    d128 = torch.randn(1, 1, 4, 128)
    assert dispatch.resolve("attention", "triton", d128, d128, d128) == "triton"  # the largest head dim it takes
    big = torch.randn(1, 1, 4, 160)
    assert dispatch.resolve("attention", "sdpa", big, big, big) == "sdpa"
    with pytest.raises(BackendUnavailable, match="head dim 160"):
        attention(big, big, big, impl="triton")
    with pytest.raises(BackendUnavailable, match="no cuda backend"):
        attention(q, k, v, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in dispatch.why_not("attention", "triton", q, k, v)
    monkeypatch.delenv("MDM_FAST_IMPL")
    assert dispatch.resolve("attention", "auto", q, k, v, kc, vc) == "sdpa"


@pytest.mark.parametrize("impl", ["sdpa", "ref"])
def test_float64_runs_in_float64_on_the_pytorch_backends(impl):
    """float64 (a float64 model, gradient checks): the PyTorch backends compute in it, softmax included
    (an fp32 step shows at ~1e-7); the kernels refuse it by name, and auto passes them by."""
    q, k, v, kc, vc = make_inputs(2, 2, 7, 3, 8, torch.float64)
    mask = padded_mask(2, 3)
    leaves = [t.requires_grad_() for t in (q, k, v, kc, vc)]
    out = attention(*leaves, cond_mask=mask, impl=impl)
    want = oracle(*leaves, cond_mask=mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-13, rtol=1e-12)
    g = torch.randn_like(want)
    for got, exp in zip(grads(out, leaves, g), grads(want, leaves, g)):
        torch.testing.assert_close(got, exp, atol=1e-13, rtol=1e-12)
    assert dispatch.resolve("attention", "auto", q, k, v) != "triton"
    with pytest.raises(BackendUnavailable, match="dtype float64 not supported"):
        attention(q, k, v, impl="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(k=torch.randn(2, 2, 5, 8)), r"k must have shape \(B, heads, S, d\)"),
    (dict(v=torch.randn(2, 2, 6, 16)), r"v must have shape"),
    (dict(k_cond=torch.randn(2, 2, 3, 16)), "given together"),
    (dict(k_cond=torch.randn(2, 2, 3, 16), v_cond=torch.randn(2, 2, 4, 16)), "v_cond must have shape"),
    (dict(k_cond=torch.randn(2, 2, 3, 16), v_cond=torch.randn(2, 2, 3, 16), cond_mask=torch.ones(2, 4)),
     r"cond_mask must have shape \(B, T\)"),
    (dict(cond_mask=torch.ones(2, 3)), "cond_mask given without"),
    (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float64)), r"float32 or float64 like q \(torch.float32\)"),
    (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float16)), r"float16, bfloat16, float32 or float64 like q"),
    (dict(q=torch.randn(2, 2, 5, 16).int()), "float16/bfloat16/float32/float64 tensor"),
    (dict(v=torch.randn(2, 2, 5, 16, device="meta")), "v is on meta but q is on cpu"),
    (dict(k_cond=torch.randn(2, 2, 0, 16), v_cond=torch.randn(2, 2, 0, 16)), "T = 0 text tokens"),
    (dict(k_cond=torch.randn(2, 2, 3, 16), v_cond=torch.randn(2, 2, 3, 16),
          cond_mask=torch.ones(2, 3, dtype=torch.complex64)), "cond_mask must be bool, integer or float"),
    (dict(k=torch.randn(2, 2, 0, 16), v=torch.randn(2, 2, 0, 16)), r"k has no keys \(S = 0\)"),
    (dict(self_mask=torch.ones(2, 4)), r"self_mask must have shape \(B, S\)"),
    (dict(scale=-0.5), r"scale must be a finite float > 0"),
    (dict(scale=0.0), r"scale must be a finite float > 0"),
    (dict(scale=float("inf")), r"scale must be a finite float > 0"),
    (dict(q=torch.randn(2, 2, 5, 0), k=torch.randn(2, 2, 5, 0), v=torch.randn(2, 2, 5, 0)), "with d >= 1"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(q=torch.randn(2, 2, 5, 16), k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        attention(**args, impl="ref")


def test_bad_layout_inputs_raise():
    with pytest.raises(ValueError, match="divisible by heads"):
        attention_from_qkv(torch.randn(1, 3 * 10, 4), None, None, heads=3)
    with pytest.raises(ValueError, match="divisible by heads=True"):  # a bool is no head count
        attention_from_qkv(torch.randn(1, 3 * 8, 4), None, None, heads=True)
    with pytest.raises(ValueError, match=r"kv_cond must have shape \(B, T, 2\*C\)"):
        attention_from_qkv(torch.randn(1, 3 * 8, 4), torch.randn(1, 2, 8), None, heads=2)
    with pytest.raises(ValueError, match="kv_cond has T = 0 text tokens; pass kv_cond=None"):
        attention_from_qkv(torch.randn(1, 3 * 8, 4), torch.randn(1, 0, 16), None, heads=2)
    with pytest.raises(ValueError, match="qkv must be"):
        attention_from_qkv(torch.randn(1, 24), None, None, heads=2)


# ---- GPU: every backend at the model's shapes --------------------------------------------------

GPU_SHAPES = {"level1-d64": (2, 8, 1024, 64), "level2-d96": (2, 8, 256, 96), "d128-odd": (1, 4, 333, 128)}


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("impl", BACKENDS + ("flash_attn", "xformers"))
def test_gpu_error_bounded_by_torch_lowprec(impl, shape, dtype):
    if impl in ("flash_attn", "xformers"):
        pytest.importorskip(impl)
    B, H, L, d = GPU_SHAPES[shape]
    T = 77 if shape == "d128-odd" else 128
    q, k, v, kc, vc = make_inputs(B, H, L, T, d, dtype, device="cuda")
    mask = (torch.arange(T, device="cuda")[None] < torch.tensor([T // 2, 0][:B], device="cuda")[:, None]).int()
    leaves = [t.requires_grad_() for t in (q, k, v, kc, vc)]
    ref = oracle(*leaves, cond_mask=mask)  # fp64
    low = attention(*leaves, cond_mask=mask, impl="ref")  # PyTorch's einsum formulation at this dtype
    out = attention(*leaves, cond_mask=mask, impl=impl)
    g = torch.randn_like(ref)
    assert _max_err(out, ref) <= 2 * _max_err(low, ref) + 1e-3
    for name, got, lo, want in zip("q k v kc vc".split(), grads(out, leaves, g.to(dtype)),
                                   grads(low, leaves, g.to(dtype)), grads(ref, leaves, g)):
        assert torch.isfinite(got).all(), name
        assert _max_err(got, want) <= 2 * _max_err(lo, want) + 1e-3, name


# the GPU's shapes, and tiny ones with the same head dims for the interpreter (fp16: it computes bf16 dots wrongly)
CANDIDATE_CASES = {"cuda": (torch.bfloat16, 77, {"level1-d64": GPU_SHAPES["level1-d64"],
                                                  "d128-odd": GPU_SHAPES["d128-odd"]}),
                   "cpu": (torch.float16, 5, {"level1-d64": (1, 2, 20, 64), "d128-odd": (1, 1, 17, 128)})}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("masked", [True, False], ids=["cmask", "nomask"])  # nomask: the public configs
@pytest.mark.parametrize("shape", ["level1-d64", "d128-odd"])
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_every_hopper_autotune_candidate_is_correct(monkeypatch, kernel, shape, masked, device):
    """The autotuner times one candidate per shape and keeps the fastest: every one must be right. One
    that does not fit the card (shared memory: dk/dv 64x64 for d 128 without a text mask) is timed as
    infinitely slow by the autotuner, never launched, and skipped here. On the CPU the interpreter runs
    the Hopper candidates (the interpreter's own list is shorter) at tiny shapes."""
    from mdm_fast.kernels import attention as kern

    dtype, T, shapes = CANDIDATE_CASES[device]
    B, H, L, d = shapes[shape]
    key = (kernel, 64 if d <= 64 else 128)
    fn = {"fwd": kern._fwd_kernel, "dq": kern._bwd_dq_kernel, "dkdv": kern._bwd_dkdv_kernel}[kernel]
    q, k, v, kc, vc = make_inputs(B, H, L, T, d, dtype, device=device)
    mask = padded_mask(B, T, device=device) if masked else None
    leaves = [t.requires_grad_() for t in (q, k, v, kc, vc)]
    ref = oracle(*leaves, cond_mask=mask)
    low = attention(*leaves, cond_mask=mask, impl="ref")
    g = torch.randn_like(ref)
    want = grads(ref, leaves, g)  # (once: the oracle's graph is freed after it)
    bounds = [2 * _max_err(lo, w) + 1e-3 for lo, w in zip(grads(low, leaves, g.to(q.dtype)), want)]
    candidates, ran, own = kern._HOPPER[key], [], kern._candidates
    for candidate in candidates:  # the autotuner's only config (the interpreter would prune to its own);
        # the other kernels of the call keep their own candidates
        monkeypatch.setattr(kern, "_candidates", lambda k, *a: [candidate] if k == kernel else own(k, *a))
        monkeypatch.setattr(fn, "configs", [kern._config(candidate)])
        fn.cache.clear()
        try:
            out = attention(*leaves, cond_mask=mask, impl="triton")
            got = grads(out, leaves, g.to(q.dtype))
        except Exception as e:  # triton's OutOfResources, raised at the launch (a single candidate is not timed)
            if "out of resource" not in str(e):
                raise
            continue
        ran.append(candidate)
        assert _max_err(out, ref) <= 2 * _max_err(low, ref) + 1e-3, candidate
        for name, gr, w, bound in zip("q k v kc vc".split(), got, want, bounds):
            assert _max_err(gr, w) <= bound, (candidate, name)
    fn.cache.clear()
    assert len(ran) >= len(candidates) - 1, ran


@pytest.mark.gpu
@pytest.mark.parametrize("token_major", [False, True], ids=["channel-major", "token-major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_layout_fused(dtype, token_major):
    B, heads, d, L, T = 2, 8, 64, 1024, 128
    C = heads * d
    qkv = torch.randn(B, 3 * C, L, device="cuda", dtype=dtype)
    if token_major:  # the channels_last model's qkv conv output
        qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    qkv.requires_grad_()
    kv_lin = torch.randn(B, T, 2 * C, device="cuda", dtype=dtype, requires_grad=True)
    mask = padded_mask(B, T, device="cuda")
    want = _public_block(qkv.double(), kv_lin.double(), mask, heads)
    low = _public_block(qkv, kv_lin, mask, heads)
    out = attention_from_qkv(qkv, kv_lin, mask, heads, impl="triton")
    g = torch.randn_like(want)
    assert _max_err(out, want) <= 2 * _max_err(low, want) + 1e-3
    for got, lo, w in zip(torch.autograd.grad(out, (qkv, kv_lin), g.to(dtype)),
                          torch.autograd.grad(low, (qkv, kv_lin), g.to(dtype)),
                          torch.autograd.grad(want, (qkv, kv_lin), g)):
        assert _max_err(got, w) <= 2 * _max_err(lo, w) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 128])
def test_gpu_fp32_matches_oracle(d):
    """fp32 inputs run ieee dots on a GPU (tf32's ~1e-3 errors would fail the fp32 tolerances here):
    forward and gradients at the CPU tests' fp32 tolerance, with tails and a padded text mask."""
    B, H, L, T = 2, 2, 300, 77
    check_against_oracle("triton", *make_inputs(B, H, L, T, d, torch.float32, device="cuda"),
                         padded_mask(B, T, device="cuda"))


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph():
    q, k, v, kc, vc = make_inputs(2, 8, 256, 128, 64, torch.bfloat16, device="cuda")
    mask = padded_mask(2, 128, device="cuda")
    eager = attention(q, k, v, kc, vc, mask, impl="triton")
    compiled = torch.compile(lambda *a: attention(*a, impl="triton"))
    torch.testing.assert_close(compiled(q, k, v, kc, vc, mask), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(q, k, v, kc, vc, mask, impl="triton")
    graph.replay()
    torch.testing.assert_close(captured, eager)


# ---- flash_attn / xformers backends, through stand-ins of their documented APIs -----------------
# Neither library is installed on any machine we run (CI or the lent GPUs), so these tests check our
# side of the call: the (B, L, H, d) layout they document, the scale, the masked text branch going to
# SDPA, gradients, and the reasons. Each stand-in computes with SDPA and records what it was given.


def _stand_in(monkeypatch, package):
    import importlib.machinery
    import types

    import torch.nn.functional as F

    calls = []

    def attend(q, k, v, scale):  # (B, L, H, d) in and out
        assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and k.shape == v.shape
        calls.append((tuple(q.shape), tuple(k.shape), scale))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    if package == "flash_attn":
        def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
            assert q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0 and not causal
            return attend(q, k, v, softmax_scale)

        module("flash_attn", flash_attn_func=flash_attn_func)
    else:
        def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
            assert attn_bias is None and p == 0.0
            return attend(query, key, value, scale)

        module("xformers", ops=module("xformers.ops", memory_efficient_attention=memory_efficient_attention))
    cpu_ok = dispatch.package_reason  # the stand-ins run on CPU: drop the CUDA requirement

    def package_reason(pkg, *tensors):
        return cpu_ok(pkg) if pkg == package else cpu_ok(pkg, *tensors)

    monkeypatch.setattr(dispatch, "package_reason", package_reason)
    return calls


@pytest.mark.parametrize("package", ["flash_attn", "xformers"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_library_backends_through_stand_ins(monkeypatch, package, with_mask):
    calls = _stand_in(monkeypatch, package)
    B, H, L, T, d = 2, 2, 13, 5, 32
    inputs = make_inputs(B, H, L, T, d, torch.bfloat16)
    mask = padded_mask(B, T, all_masked=1) if with_mask else None
    check_against_oracle(package, *inputs, mask, scale=0.2)
    # the library saw (B, L, H, d) and the scale; a masked text branch went to SDPA instead
    assert calls[0] == ((B, L, H, d), (B, L, H, d), 0.2)
    assert len(calls) == (1 if with_mask else 2)
    if not with_mask:
        assert calls[1] == ((B, L, H, d), (B, T, H, d), 0.2)
    qkv = torch.randn(B, 3 * H * d, L).to(torch.bfloat16)
    kv = torch.randn(B, T, 2 * H * d).to(torch.bfloat16)
    torch.testing.assert_close(attention_from_qkv(qkv, kv, mask, H, impl=package),
                               attention_from_qkv(qkv, kv, mask, H, impl="sdpa"), atol=1e-2, rtol=1e-2)


def test_library_backend_reasons(monkeypatch):
    q, k, v, kc, vc = make_inputs(1, 1, 4, 3, 32, torch.bfloat16)
    for package in ("flash_attn", "xformers"):
        with pytest.raises(BackendUnavailable, match=f"the {package} package is not installed"):
            attention(q, k, v, impl=package)
    _stand_in(monkeypatch, "flash_attn")
    with pytest.raises(BackendUnavailable, match="key mask on the self branch"):
        attention(q, k, v, impl="flash_attn", self_mask=torch.ones(1, 4))
    with pytest.raises(BackendUnavailable, match="head dim 30"):
        attention(*make_inputs(1, 1, 4, 0, 30, torch.bfloat16)[:3], impl="flash_attn")
    with pytest.raises(BackendUnavailable, match="dtype float32 not supported"):
        attention(*make_inputs(1, 1, 4, 0, 32, torch.float32)[:3], impl="flash_attn")
    assert dispatch.resolve("attention", "auto", q, k, v, kc, vc) == "sdpa"  # by name only, until measured
