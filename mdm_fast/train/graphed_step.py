"""The training step with no host synchronisation, its forward + backward replayed from a CUDA graph.

For one process on one GPU (``cuda_graphs: auto``): each micro-step's forward and backward (the
diffusion loss of every level under autocast, the gradient accumulation) is captured once, for the
first batch's shapes, and replayed; the update (gradient clipping, the fused Adam/AdamW, then the
trainer's EMA) runs eagerly on device values. Nothing is read back to the host per step: a non-finite
loss skips the update on the device (the optimizer's ``found_inf``: parameters, moments and step
counts unchanged), and the losses and the gradient norm stay device tensors until they are logged,
so the host prepares the next batch while the GPU runs this one.

The numbers are the eager step's: the same kernels, and the same random draws (the step's generator
is registered with the graph and re-seeded before each micro-step; a replay draws from its seed and
offset). A batch whose shapes differ from the captured ones (a longer caption, say) runs eagerly
through the same function and the same gradient buffers.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from mdm_fast.engine import GraphedCallable

LossFn = Callable[..., Tuple[Tensor, Dict[str, Tensor]]]


class GraphedTrainingStep:
    """``micro_step(*inputs)`` once per micro-batch (the trainer's: images, cond, mask), then ``update()``.

    ``loss_fn(*inputs) -> (loss, stats)`` draws its noise from ``generator``; the mean of
    ``loss`` and of the ``loss_level*`` stats over the micro-batches is what ``update`` reports.
    ``optimizer``: a fused Adam/AdamW (the only ones that skip a step on a device flag).
    ``capture=False`` runs the same logic without a graph (on a CPU, in tests).
    """

    def __init__(self, params: List[Tensor], optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 generator: torch.Generator, accumulations: int, max_grad_norm: float, capture: bool):
        if not (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")):
            raise ValueError("graphed training needs torch.optim.Adam/AdamW(..., fused=True) (it skips a step with a "
                             f"non-finite loss on the device), got {type(optimizer).__name__} "
                             f"fused={optimizer.defaults.get('fused')}")
        self.params, self.optimizer, self.loss_fn = params, optimizer, loss_fn
        self.accumulations, self.max_grad_norm = accumulations, max_grad_norm
        self._sums: Dict[str, Tensor] = {}  # loss and per-level losses of this step, over its micro-batches
        self.runner = GraphedCallable(self._micro, warmup=2, capture=capture, clone_outputs=False,
                                      generators=(generator,), after_warmup=self._reset, max_graphs=1)

    @property
    def eager_calls(self) -> int:
        """Micro-steps that ran eagerly because their shapes differed from the captured ones."""
        return self.runner.eager_calls

    def micro_step(self, *inputs: Tensor) -> None:
        self.runner(*inputs)

    def update(self) -> Tuple[Dict[str, Tensor], Tensor]:
        """Clip, step, zero the gradients: (stats as 0-dim device tensors, ok: 1.0, or 0.0 where the
        loss was not finite and the optimizer skipped the step)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        skipped = (~torch.isfinite(self._sums["loss"])).float()  # (), 1.0 = skip
        self.optimizer.grad_scale, self.optimizer.found_inf = None, skipped
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=False)  # the graph accumulates into these buffers
        stats = {k: v.clone() for k, v in self._sums.items()}
        stats["grad_norm"] = norm
        torch._foreach_zero_(list(self._sums.values()))
        return stats, 1.0 - skipped

    def _micro(self, *inputs: Tensor) -> None:
        loss, stats = self.loss_fn(*inputs)
        (loss / self.accumulations).backward()
        for k, v in [("loss", loss)] + [(k, v) for k, v in stats.items() if k.startswith("loss_level")]:
            v = v.detach().float() / self.accumulations
            if k in self._sums:
                self._sums[k].add_(v)
            else:  # first (eager or warm-up) run: the buffer the graph then accumulates into
                self._sums[k] = v.clone()

    def _reset(self) -> None:
        """Undo the warm-up runs: no gradient, no loss."""
        self.optimizer.zero_grad(set_to_none=False)
        torch._foreach_zero_(list(self._sums.values()))
