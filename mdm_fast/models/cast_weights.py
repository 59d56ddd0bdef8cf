"""A model called with its convolution and linear weights cast once, for sampling under autocast.

Under ``torch.autocast`` every convolution and linear layer casts its fp32 weight and bias at every
call: 459 casting kernels per forward of the public 256x256 model (counted on fake tensors), about 40%
of its kernels, which a CUDA-graph step at batch 2 replays one after another. :class:`CastWeights` holds those parameters
cast to the autocast dtype once and calls the model on them (``torch.func.functional_call``): the
same values autocast would produce, without the kernels. Other parameters (norms, embeddings) keep
their dtype, so the ops autocast runs in fp32 see what they saw before.

The copies are the weights when built (as a captured graph is, and the fast model's cached
time-projection weights): after the weights change (loading, training), build a new one. Sharded
(FSDP2) parameters are left to autocast.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from torch import Tensor


class CastWeights:
    """``CastWeights(model, torch.bfloat16)(*args)`` = ``model(*args)`` with the nn.Conv2d / nn.Linear
    parameters replaced by ``dtype`` copies; meant for no-grad calls under autocast to ``dtype``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.params: Dict[str, Tensor] = {}  # name -> the model's parameter
        for prefix, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                for name, p in module.named_parameters(recurse=False):
                    if type(p) in (nn.Parameter, Tensor) and p.is_floating_point() and p.dtype != dtype:
                        self.params[f"{prefix}.{name}" if prefix else name] = p
        with torch.no_grad():
            copies: Dict[int, Tensor] = {}  # a parameter shared by two modules gets one copy
            self.copies = {k: copies.setdefault(id(p), p.detach().to(dtype)) for k, p in self.params.items()}

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.copies, args, kwargs, strict=False)
