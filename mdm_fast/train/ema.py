"""Exponential moving average of the weights, with the public ``ModelEma`` semantics: the decay is 0
(a plain copy) for the first ``warmup_steps`` updates, then ``decay``; every state-dict entry
(parameters and buffers) is averaged. An update is two multi-tensor kernels, whatever the number of
tensors."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup_steps = decay, warmup_steps
        self.counter = 0  # updates made (host); minus the skipped ones counted on the device, if any
        self._skipped: Optional[Tensor] = None

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: Optional[Tensor] = None) -> None:
        """``ema = decay * ema + (1 - decay) * weights``. ``skipped``: a 0-dim tensor on the weights'
        device, 1 where the optimizer skipped this step (a non-finite loss): then the EMA and its
        warm-up count stay as they were, decided on the device, without reading the flag back."""
        emas, current = self._float_pairs(model)
        if skipped is None:
            decay = self.decay if self.count_on_host() >= self.warmup_steps else 0.0
            torch._foreach_mul_(emas, decay)
            torch._foreach_add_(emas, current, alpha=1.0 - decay)
        else:
            if self._skipped is None:
                self._skipped = torch.zeros((), device=skipped.device)
            warm = self._skipped <= self.counter - self.warmup_steps  # updates made so far >= warmup_steps
            decay = torch.where(skipped > 0, 1.0, torch.where(warm, self.decay, 0.0))  # 1: unchanged
            torch._foreach_mul_(emas, decay)
            torch._foreach_add_(emas, torch._foreach_mul(current, 1.0 - decay))
            self._skipped += skipped
        self.counter += 1

    def count_on_host(self) -> int:
        """Updates made (reads the device's skipped count back, where there is one)."""
        return self.counter - (0 if self._skipped is None else int(self._skipped))

    def set_count(self, n: int) -> None:
        self.counter, self._skipped = n, None

    def _float_pairs(self, model: nn.Module) -> Tuple[List[Tensor], List[Tensor]]:
        """(EMA tensors, the model's tensors in their dtype) of the floating-point entries; the
        others are copied."""
        current = model.state_dict()
        emas, values = [], []
        for k, ema_v in self.module.state_dict().items():
            v = current[k].detach()
            if hasattr(v, "full_tensor"):  # an FSDP shard: the EMA keeps whole tensors
                v = v.full_tensor()
            if ema_v.dtype.is_floating_point:
                emas.append(ema_v)
                values.append(v.to(ema_v.dtype))
            else:
                ema_v.copy_(v)
        return emas, values

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def extra_state(self) -> Dict[str, Any]:
        return {"counter": self.count_on_host(), "decay": self.decay, "warmup_steps": self.warmup_steps}
