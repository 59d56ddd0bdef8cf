"""The differentiable custom ops' eager path (an autograd.Function calling the implementations directly)
computes what the custom op's registered autograd computes, bit for bit; tracing sees the custom op."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mdm_fast.ops import (attention, attention_from_qkv, bias_add, concat_channels, group_norm_act,
                          upsample_conv3x3)


def _leaves(*shapes, dtype=torch.float32):
    """Inputs that need gradients; 1-D ones (weights, biases) are Parameters, as in a model."""
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) if len(s) == 1 else torch.randn(s, dtype=dtype)
            .requires_grad_() for s in shapes]


def _value_and_grads(fn, leaves):
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, torch.randn_like(out))], out.grad_fn


def _group_norm(impl):
    return lambda x, w, b, sc, sh: group_norm_act(x, 3, w, b, 1e-5, sc, sh, impl=impl)


def _group_norm_op(x, w, b, sc, sh):
    return torch.ops.mdm_fast.group_norm_act_fwd(x, w, b, sc, sh, 3, 1e-5, "silu", "triton")[0]


def _group_norm_input_bias(x, w, b, sc, sh, xb):
    return group_norm_act(x, 3, w, b, 1e-5, sc, sh, impl="triton", input_bias=xb)


def _group_norm_input_bias_op(x, w, b, sc, sh, xb):
    return torch.ops.mdm_fast.group_norm_act_fwd(x, w, b, sc, sh, 3, 1e-5, "silu", "triton", None, xb)[0]


def _bias_add(x, b, r):
    return bias_add(x, b, r, impl="triton")


def _bias_add_op(x, b, r):
    return torch.ops.mdm_fast.bias_add(x, b, r, "triton")


def _attention(q, k, v, kc, vc):
    return attention(q, k, v, kc, vc, torch.tensor([[1, 1, 0], [1, 0, 0]]), impl="triton")


def _attention_op(q, k, v, kc, vc):
    keep = torch.tensor([[1, 1, 0], [1, 0, 0]]) != 0
    return torch.ops.mdm_fast.attention_fwd(q, k, v, kc, vc, keep, None, 16 ** -0.5)[0]


def _qkv(qkv, kv):
    return attention_from_qkv(qkv, kv, torch.ones(2, 3), heads=2, impl="triton")


def _qkv_op(qkv, kv):
    return torch.ops.mdm_fast.attention_qkv_fwd(qkv, kv, torch.ones(2, 3) != 0, 2, 8 ** -0.5)[0]


def _upsample(x, w, b):
    return upsample_conv3x3(x, w, b, impl="torch")


def _upsample_op(x, w, b):
    return torch.ops.mdm_fast.upsample_conv3x3(x, w, b, "torch")


CASES = {  # name: (public call, the custom op's call, input shapes, the eager Function's backward node)
    "group_norm_act": (_group_norm("triton"), _group_norm_op, [(2, 6, 5, 3), (6,), (6,), (2, 6), (2, 6)],
                       "GroupNormActBackward"),
    "group_norm_act input_bias": (_group_norm_input_bias, _group_norm_input_bias_op,
                                  [(2, 6, 5, 3), (6,), (6,), (2, 6), (2, 6), (6,)], "GroupNormActBackward"),
    "bias_add": (_bias_add, _bias_add_op, [(2, 6, 5, 3), (6,), (2, 6, 5, 3)], "BiasAddBackward"),
    "attention": (_attention, _attention_op, [(2, 2, 7, 16)] * 3 + [(2, 2, 3, 16)] * 2, "AttentionBackward"),
    "attention_from_qkv": (_qkv, _qkv_op, [(2, 48, 9), (2, 3, 32)], "AttentionQKVBackward"),
    "upsample_conv3x3": (_upsample, _upsample_op, [(2, 4, 3, 5), (6, 4, 3, 3), (6,)], "UpsampleConv3x3Backward"),
}


@pytest.mark.parametrize("name", CASES)
def test_eager_path_equals_the_custom_op_autograd(name):
    public, op, shapes, node = CASES[name]
    got, grad_fn = _value_and_grads(public, _leaves(*shapes))
    want, op_grad_fn = _value_and_grads(op, _leaves(*shapes))
    assert type(grad_fn).__name__ == node  # the eager path ran, not the custom op
    assert type(op_grad_fn).__name__ != node
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("name", CASES)
def test_tracing_sees_the_custom_op(name):
    public, _, shapes, _ = CASES[name]
    graph = make_fx(public, tracing_mode="fake")(*_leaves(*shapes)).code
    assert "mdm_fast." in graph and "Backward" not in graph


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    """A tensor subclass, as DTensor is one."""


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("how", ["dispatch mode", "subclass"])
def test_a_dispatch_mode_or_a_subclass_sees_the_custom_op(name, how):
    """Plain tensors under a Python dispatch mode, or a tensor subclass with none active, go through the
    custom op, not the eager Function."""
    public, _, shapes, node = CASES[name]
    leaves = _leaves(*shapes)
    if how == "subclass":
        leaves[0] = leaves[0].detach().as_subclass(_Sub).requires_grad_()
    with _PassThrough() if how == "dispatch mode" else torch.enable_grad():
        out = public(*leaves)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ != node


def test_the_custom_ops_side_outputs_need_no_gradient():
    """The statistics and log-sum-exps the custom ops return beside their output carry no gradient."""
    group_norm = torch.ops.mdm_fast.group_norm_act_fwd(*_leaves(*CASES["group_norm_act"][2]), 3, 1e-5, "silu", "ref")
    q, k, v = _leaves((2, 2, 7, 16), (2, 2, 7, 16), (2, 2, 7, 16))  # (B, heads, L, d)
    attn = torch.ops.mdm_fast.attention_fwd(q, k, v, None, None, None, None, 0.25)
    for outputs in (group_norm, attn):
        assert outputs[0].requires_grad and not any(t.requires_grad for t in outputs[1:])


def test_no_grad_calls_skip_autograd():
    x, w, b, sc, sh = _leaves(*CASES["group_norm_act"][2])
    with torch.no_grad():
        assert _group_norm("triton")(x, w, b, sc, sh).grad_fn is None


class _ZeroFills(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensors filled with zeros (what autograd makes for an output's missing gradient)."""

    OPS = {"aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default", "aten.zero_.default",
           "aten.fill_.Scalar"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += str(func) in self.OPS
        return func(*args, **(kwargs or {}))


SIDE_OUTPUTS = {  # name: (call, input shapes) of ops with a side output (statistics, moments, log-sum-exps)
    **{f"{name} {path}": (CASES[name][i], CASES[name][2]) for name in ("group_norm_act", "attention",
                                                                      "attention_from_qkv")
       for i, path in enumerate(("eager Function", "custom op"))},
    "concat_channels": (lambda a, b: concat_channels(a, b, impl="ref"), [(2, 3, 5, 3), (2, 4, 5, 3)]),
}


@pytest.mark.parametrize("name", SIDE_OUTPUTS)
def test_side_outputs_get_no_zero_gradients(name):
    """Statistics, moments and log-sum-exps carry no gradient: backward gets None for them, not a
    zero fill per call."""
    fn, shapes = SIDE_OUTPUTS[name]
    out = fn(*_leaves(*shapes))
    grad = torch.randn_like(out)
    with _ZeroFills() as fills:
        out.backward(grad)
    assert fills.n == 0


class _NoGrad(torch.autograd.Function):
    """y -> a copy whose backward hands y no gradient (None), as a consumer that needs none may."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return None


@pytest.mark.parametrize("name", SIDE_OUTPUTS)
def test_a_missing_output_gradient_gives_no_input_gradients(name):
    """With zero-filling off, a backward whose main output got no gradient returns None for every input."""
    fn, shapes = SIDE_OUTPUTS[name]
    leaves = _leaves(*shapes)
    out = _NoGrad.apply(fn(*leaves))
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    assert all(g is None for g in grads)
