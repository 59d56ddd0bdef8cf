"""mdm_fast.ops.concat_channels(_for_norm): torch.cat((a, b), 1), and the partial moments it hands to the norm."""
import pytest
import torch

from mdm_fast.kernels import group_norm as gn
from mdm_fast.ops import BackendUnavailable, concat_channels, concat_channels_for_norm, dispatch, group_norm_act
from mdm_fast.ops.group_norm_act import reference

CL = torch.channels_last


def _pair(B, c1, c2, H, W, device, dtype=torch.float32, fmt=CL, offset=0.0):
    a = (torch.randn(B, c1, H, W, device=device) + offset).to(dtype).contiguous(memory_format=fmt)
    b = (torch.randn(B, c2, H, W, device=device) - offset).to(dtype).contiguous(memory_format=fmt)
    return a.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 4, 5, 7), (1, 3, 5, 1, 1), (2, 24, 40, 9, 13)])  # B, C1, C2, H, W
def test_triton_equals_torch_cat_forward_and_backward(dtype, shape, device):
    B, c1, c2, H, W = shape
    a, b = _pair(B, c1, c2, H, W, device, dtype)
    out = concat_channels(a, b, impl="triton")
    want = torch.cat((a, b), 1)
    assert torch.equal(out, want) and out.is_contiguous(memory_format=CL) and out.dtype == dtype
    g = torch.randn_like(want)
    for got, exp in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(want, (a, b), g)):
        assert torch.equal(got, exp)


def test_copy_loops_over_tiles_and_parts(monkeypatch, device):
    from mdm_fast.kernels import rows

    monkeypatch.setattr(rows, "BLOCK_C", 4)  # rows of 8 and 5 channels in chunks of 4
    monkeypatch.setattr(rows, "TILE", 16)  # 4 rows per tile; 117 rows in 4 parts
    monkeypatch.setattr(rows, "PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(gn, "_num_sms", lambda index: 8)
    a, b = _pair(2, 8, 5, 9, 13, device)
    assert torch.equal(concat_channels(a, b, impl="triton"), torch.cat((a, b), 1))


# lanes of a row per tile (the tests' tiles), of two folded rows, or one lane (LANE_ACCUMULATORS off)
@pytest.mark.parametrize("acc_rows", [None, 2, 1])
@pytest.mark.parametrize("c1,c2,G,dtype", [(8, 4, 4, torch.float32), (10, 14, 6, torch.float32),
                                          (8, 8, 1, torch.float32), (16, 8, 24, torch.float16)])
def test_moments_are_the_norms_partials(small_norm_parts, monkeypatch, acc_rows, c1, c2, G, dtype, device):
    """The moments equal those of the norm's own statistics launch, part by part, and the norm given them
    equals the norm without them; offset data checks the shifted lane sums and their merge."""
    from mdm_fast.kernels import rows

    if acc_rows == 1:
        monkeypatch.setattr(gn, "LANE_ACCUMULATORS", False)
    elif acc_rows is not None:
        monkeypatch.setattr(rows, "row_lanes", lambda block_s, *a: (min(block_s, acc_rows), 1))
    a, b = _pair(2, c1, c2, 9, 13, device, dtype, offset=50.0)
    assert acc_rows is None or rows.blocks(min(c1, c2), a.element_size())["ACC_ROWS"] == acc_rows
    out, moments = concat_channels_for_norm(a, b, G, impl="triton")
    plan = gn.moments_plan(out.shape, G, out.device, out.element_size())
    assert plan is not None and plan.nsplit > 1 and moments.shape == (2, 2, plan.nsplit, c1 + c2)
    rows = out.detach().permute(0, 2, 3, 1).reshape(2, -1, c1 + c2).double()  # (B, S, C)
    for j in range(plan.nsplit):
        part = rows[:, j * plan.rows:(j + 1) * plan.rows]
        mean = part.mean(1)
        torch.testing.assert_close(moments[0, :, j].double(), mean, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(moments[1, :, j].double(), ((part - mean[:, None]) ** 2).sum(1),
                                   rtol=1e-4, atol=1e-3)
    w, bias = torch.randn(c1 + c2, device=device), torch.randn(c1 + c2, device=device)
    y = group_norm_act(out, G, w, bias, impl="triton", moments=moments)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # another shift, the same fp32 moments: an ulp of y at most
    torch.testing.assert_close(y, group_norm_act(out, G, w, bias, impl="triton"), rtol=tol, atol=tol)
    want = reference(out.detach().double(), G, w.double(), bias.double())
    assert (y.double() - want).abs().max().item() < {torch.float32: 1e-4, torch.float16: 4e-3}[dtype]


def test_the_norm_uses_the_moments(small_norm_parts, device):
    """Moments of other data change the norm's output: the statistics launch really is skipped."""
    a, b = _pair(2, 8, 8, 9, 13, device)
    out, moments = concat_channels_for_norm(a, b, 4, impl="triton")
    wrong = moments.clone()
    wrong[0] += 1.0  # every part's mean shifted by one
    y = group_norm_act(out, 4, None, None, impl="triton", moments=moments)
    assert not torch.allclose(y, group_norm_act(out, 4, None, None, impl="triton", moments=wrong), atol=0.1)


def test_no_moments_where_the_norm_takes_its_fused_path_or_the_copy_is_torch_cat(small_norm_parts, device):
    a, b = _pair(2, 8, 8, 9, 13, device)
    assert concat_channels_for_norm(a, b, 4, impl="ref")[1] is None
    assert concat_channels_for_norm(a, b, 0, impl="triton")[1] is None  # no norm named
    a2, b2 = _pair(2, 8, 8, 9, 13, device, fmt=torch.contiguous_format)
    out, moments = concat_channels_for_norm(a2, b2, 4)  # NCHW: torch.cat
    assert moments is None and out.is_contiguous() and torch.equal(out, torch.cat((a2, b2), 1))


def test_the_norm_rejects_moments_that_do_not_fit(small_norm_parts, device):
    a, b = _pair(2, 8, 8, 9, 13, device)
    out, moments = concat_channels_for_norm(a, b, 4, impl="triton")
    with pytest.raises(ValueError, match=r"moments must be None or a \(2, 2, parts, 16\) float32"):
        group_norm_act(out, 4, None, None, impl="triton", moments=moments[:, :, :, :8])
    with pytest.raises(ValueError, match=r"moments must be \(2, 2, 3, 16\)"):
        group_norm_act(out, 4, None, None, impl="triton", moments=moments[:, :, :2])
    # the ref backend ignores moments (it computes exact statistics itself)
    torch.testing.assert_close(group_norm_act(out, 4, None, None, impl="ref", moments=moments),
                               reference(out, 4, None, None))


def test_opcheck(small_norm_parts):
    """Schema, fake tensor and autograd registration; the triton backend's fake outputs (a channels_last
    result; the moments' shape, or none) against the real ones."""
    a, b = _pair(2, 3, 5, 4, 3, "cpu")
    torch.library.opcheck(torch.ops.mdm_fast.concat_channels, (a, b, 0, "ref"))
    torch.library.opcheck(torch.ops.mdm_fast.concat_channels, (a, b, 2, "ref"))
    for groups in (0, 2):  # no norm; a norm on its split path (moments)
        torch.library.opcheck(torch.ops.mdm_fast.concat_channels, (a, b, groups, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


def test_dispatch_reasons():
    a, b = _pair(2, 4, 4, 3, 3, "cpu")
    assert "channels_last" in dispatch.why_not("concat_channels", "triton", a.contiguous(), b)
    assert "torch.cat promotes" in dispatch.why_not("concat_channels", "triton", a, b.half())
    with pytest.raises(BackendUnavailable, match="channels_last"):
        concat_channels(a.contiguous(), b, impl="triton")
    empty_a, empty_b = a[:0], b[:0]  # an empty batch: nothing to launch, torch.cat's result
    assert "empty" in dispatch.why_not("concat_channels", "triton", empty_a, empty_b)
    assert concat_channels(empty_a, empty_b).shape == (0, 8, 3, 3)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 4, 3), torch.randn(2, 4, 3, 3)), r"a must be a \(B, C, H, W\) float tensor"),
    ((torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3).long()), r"b must be a \(B, C, H, W\) float tensor"),
    ((torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2)), "must share the batch, height, width"),
    ((torch.randn(2, 4, 3, 3), torch.randn(3, 4, 3, 3)), "must share the batch, height, width"),
    ((torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3, device="meta")), "device"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        concat_channels(*args)


def test_bad_num_groups_raise():
    with pytest.raises(ValueError, match="num_groups must be an int >= 0"):
        concat_channels_for_norm(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), -1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 128, 64, 256, 256), (32, 768, 512, 32, 32), (4, 5, 3, 33, 31)])
def test_gpu_model_shapes_and_moments(shape):
    B, c1, c2, H, W = shape
    a, b = _pair(B, c1, c2, H, W, "cuda", torch.bfloat16)
    out, moments = concat_channels_for_norm(a, b, 32 if (c1 + c2) % 32 == 0 else 8)
    assert torch.equal(out, torch.cat((a, b), 1))
    G = 32 if (c1 + c2) % 32 == 0 else 8
    if moments is not None:
        w, bias = torch.randn(c1 + c2, device="cuda"), torch.randn(c1 + c2, device="cuda")
        torch.testing.assert_close(group_norm_act(out, G, w, bias, moments=moments),
                                   group_norm_act(out, G, w, bias), rtol=2e-2, atol=2e-2)
