"""Fused operations of mdm_fast, each a torch.library custom op with a ``ref`` (PyTorch) backend and
the fast ones it has: ``triton``, ``cuda`` (csrc: group_norm_act), ``torch``/``sdpa`` (PyTorch's own
kernels); ``mdm-fast info`` lists them.

``impl="auto"`` picks the fastest backend that can run the inputs; ``MDM_FAST_IMPL`` or
``use_impl("triton")`` override the choice globally (see :mod:`mdm_fast.ops.dispatch`).
"""
from mdm_fast.ops.dispatch import BackendUnavailable, registered_ops, use_impl  # noqa: F401
# One import line per op family below.
from mdm_fast.ops.attention import attention, attention_from_qkv  # noqa: F401
from mdm_fast.ops.bias_add import bias_add  # noqa: F401
from mdm_fast.ops.concat import concat_channels, concat_channels_for_norm  # noqa: F401
from mdm_fast.ops.group_norm_act import group_norm_act  # noqa: F401
from mdm_fast.ops.resample import nested_inner_input, nested_outer_merge, resize, upsample_conv3x3  # noqa: F401
from mdm_fast.ops.diffusion_step import noisy_pyramid, sampler_update  # noqa: F401
