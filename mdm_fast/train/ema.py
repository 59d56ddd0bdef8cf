"""Exponential moving average of the weights, with the public ``ModelEma`` semantics: the decay is 0
(a plain copy) for the first ``warmup_steps`` updates, then ``decay``; every state-dict entry
(parameters and buffers) is averaged."""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup_steps, self.counter = decay, warmup_steps, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay if self.counter >= self.warmup_steps else 0.0
        self.counter += 1
        current = model.state_dict()
        for k, ema_v in self.module.state_dict().items():
            v = current[k].detach()
            if hasattr(v, "full_tensor"):  # an FSDP shard: the EMA keeps whole tensors
                v = v.full_tensor()
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(decay).add_(v.to(ema_v.dtype), alpha=1.0 - decay)
            else:
                ema_v.copy_(v)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def extra_state(self) -> Dict[str, Any]:
        return {"counter": self.counter, "decay": self.decay, "warmup_steps": self.warmup_steps}
