"""mdm_fast.ops.bias_add: x + bias[c] (+ residual), against PyTorch in fp64, forward and gradients."""
import pytest
import torch

from mdm_fast.ops import BackendUnavailable, bias_add
from mdm_fast.ops import dispatch

# forward error bound per dtype: the fused pass rounds once, PyTorch's x + b + r twice
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [(2, 5, 3, 7), (1, 3, 1, 1), (3, 40, 9, 13)]  # odd C, H and W; one pixel; more than a block


def _inputs(shape, dtype, channels_last, residual, device):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(shape[1], device=device).requires_grad_()  # an fp32 parameter, as under autocast
    r = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_() if residual \
        else None
    return x, b, r


def _want(x, b, r):
    out = x.double() + b.double()[:, None, None]
    return out if r is None else out + r.double()


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_matches_fp64_forward_and_gradients(impl, shape, dtype, channels_last, residual, device):
    x, b, r = _inputs(shape, dtype, channels_last, residual, device)
    out = bias_add(x, b, r, impl=impl)
    want = _want(x, b, r)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert (out.double() - want).abs().max().item() <= TOL[dtype] * (1 + want.abs().max().item())
    g = torch.randn(shape, device=x.device).to(dtype)
    leaves = [t for t in (x, b, r) if t is not None]
    got = torch.autograd.grad(out, leaves, g)
    exp = torch.autograd.grad(want, leaves, g.double())
    for name, a, e in zip("x b r".split(), got, exp):
        assert a.dtype == (torch.float32 if name == "b" else dtype)
        # dbias sums B*H*W values of g, exactly representable: fp32 summation error only
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-5, atol=1e-5 * shape[0] * shape[2] * shape[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_rounds_once(dtype, channels_last, device):
    """The triton pass sums x + bias + residual in fp32 and rounds to x's dtype once: bit for bit the
    fp32 sum cast once (PyTorch's x + b + r rounds after each add). (bf16 on a GPU only: the interpreter's
    fp32 -> bf16 cast truncates.)"""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts")
    x, b, r = (t.detach() for t in _inputs((3, 40, 9, 13), dtype, channels_last, True, device))
    want = ((x.float() + b[:, None, None]) + r.float()).to(dtype)
    assert torch.equal(bias_add(x, b, r, impl="triton"), want)
    assert not torch.equal(x + b[:, None, None].to(dtype) + r, want)  # the inputs tell one rounding from two


def test_float64_on_the_ref_backend_sums_in_float64():
    """A float64 model's bias gradient sums in float64 (fp32 sums were off by ~1e-7 of it); triton refuses
    float64 by name and auto passes it by."""
    x, b, r = (t.detach().double().requires_grad_() for t in _inputs((2, 5, 3, 7), torch.float32, False, True,
                                                                        "cpu"))
    out = bias_add(x, b, r)
    want = _want(x, b, r)
    assert out.dtype == torch.float64 and torch.equal(out, want)
    g = torch.randn_like(want)
    for got, exp in zip(torch.autograd.grad(out, (x, b, r), g), torch.autograd.grad(want, (x, b, r), g)):
        torch.testing.assert_close(got, exp, rtol=1e-14, atol=1e-14)
    assert dispatch.resolve("bias_add", "auto", x, b, r) == "ref"
    with pytest.raises(BackendUnavailable, match="dtype float64 not supported"):
        bias_add(x, b, r, impl="triton")


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_a_strided_or_expanded_bias(impl, device):
    x = torch.randn(2, 4, 3, 5, device=device)
    for b in (torch.arange(8.0, device=device)[::2], torch.tensor([0.5], device=device).expand(4)):
        torch.testing.assert_close(bias_add(x, b, impl=impl), x + b[:, None, None])


def test_opcheck():
    x, b, r = _inputs((2, 3, 4, 5), torch.float32, True, True, "cpu")
    torch.library.opcheck(torch.ops.mdm_fast.bias_add, (x, b, r, "ref"))
    torch.library.opcheck(torch.ops.mdm_fast.bias_add, (x, b, None, "ref"))


def test_dispatch_reasons():
    x = torch.randn(2, 4, 3, 3)
    bad_layout = torch.randn(2, 4, 3, 3).transpose(2, 3)  # neither NCHW- nor NHWC-dense
    assert "neither" in dispatch.why_not("bias_add", "triton", bad_layout, torch.randn(4), None)
    mixed = x.contiguous(memory_format=torch.channels_last)
    assert "layout" in dispatch.why_not("bias_add", "triton", x, torch.randn(4), mixed)
    assert "float64" in dispatch.why_not("bias_add", "triton", x.double(), torch.randn(4), None)
    with pytest.raises(BackendUnavailable, match="residual's layout"):
        bias_add(x, torch.randn(4), mixed, impl="triton")
    torch.testing.assert_close(bias_add(x, torch.zeros(4), mixed), x + mixed)  # auto: the ref backend


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_more_than_2_31_elements(channels_last):
    """Offsets past 2^31 (the 1024x1024 model's outer level at a large batch): the last sample equals the
    op on that sample alone, bit for bit."""
    x, b, r = (t.detach() for t in _inputs((2, 4, 16384, 16400), torch.bfloat16, channels_last, True, "cuda"))
    assert x.numel() > 2**31
    out = bias_add(x, b, r, impl="triton")
    assert torch.equal(out[-1:], bias_add(x[-1:], b, r[-1:], impl="triton"))
    assert torch.equal(out[:1], bias_add(x[:1], b, r[:1], impl="triton"))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 4, 3),), r"x must be a \(B, C, H, W\)"),
    ((torch.randn(2, 4, 3, 3), torch.randn(3)), r"bias must be a float tensor of shape \(4,\)"),
    ((torch.randn(2, 4, 3, 3), torch.randn(4), torch.randn(2, 4, 3, 2)), "residual must be None or"),
    ((torch.randn(2, 4, 3, 3), torch.randn(4), torch.randn(2, 4, 3, 3).half()), "residual must be None or"),
])
def test_bad_inputs_raise(args, match):
    args = args + (torch.randn(4),) if len(args) == 1 else args
    with pytest.raises(ValueError, match=match):
        bias_add(*args)


@pytest.mark.gpu
def test_gpu_compiles_and_captures():
    x, b, r = _inputs((4, 64, 32, 32), torch.bfloat16, True, True, device="cuda")
    eager = bias_add(x, b, r)
    torch.testing.assert_close(torch.compile(bias_add)(x, b, r), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        bias_add(x, b, r)  # warm-up (compiles the kernel)
        with torch.cuda.graph(graph):
            out = bias_add(x, b, r)
    graph.replay()
    torch.testing.assert_close(out, eager)
