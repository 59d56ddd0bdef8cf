"""The training step with no host synchronisation, its forward + backward replayed from a CUDA graph.

For one process on one GPU (``cuda_graphs: auto``), or DDP ranks (``cuda_graphs: on``): each
micro-step's forward and backward (the diffusion loss of every level under autocast, the gradient
accumulation, under DDP the gradient all-reduce of the last micro-step) is captured once per batch
signature (the text length varies: the public data pads captions to the longest of the batch; with
accumulation, with and without the all-reduce), up to ``max_graphs``, and replayed;
the update (gradient clipping, the fused Adam/AdamW, then the trainer's EMA) runs eagerly on device
values. Nothing is read back to the host per step: a non-finite loss or gradient norm skips the
update on the device (the optimizer's ``found_inf``: parameters, moments and step counts unchanged),
and the losses and the gradient norm stay device tensors until they are logged, so the host prepares
the next batch while the GPU runs this one.

The numbers are the eager step's: the same kernels, and the same random draws (the step's generator
is registered with the graph and re-seeded before each micro-step; a replay draws from its seed and
offset). A capture met mid-step keeps the gradients and sums of the earlier micro-batches (its
warm-up's are undone); beyond ``max_graphs`` signatures a micro-step runs eagerly through the same
function and buffers. A capture that fails under ``auto`` is logged and the step runs eagerly from
then on.

Under DDP the ranks skip together (the skip flag is all-reduced on the device) and, as PyTorch's
CUDA-graph notes require, the wrapper is built on a side stream, NCCL's asynchronous error handling
is off, and the capture of the all-reducing micro-step comes after 11 eager iterations that
all-reduce (DDP times its first ten, which a capture cannot contain; ``no_sync`` ones do not count).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mdm_fast.engine import GraphedCallable
from mdm_fast.train.distributed import grad_sync

LossFn = Callable[..., Tuple[Tensor, Dict[str, Tensor]]]
DDP_TIMED_FORWARDS = 11  # DDP times the 2nd to 11th forwards that all-reduce (reading CUDA events on the host)


class GraphedMicroSteps:
    """``micro_step(*inputs)`` once per micro-batch (the trainer's: images, cond, mask), then ``update()``.

    ``loss_fn(*inputs) -> (loss, stats)`` draws its noise from ``generator``; the mean of ``loss`` and of
    the ``loss_level*`` stats over the micro-batches is what ``update`` reports. Each micro-batch
    backpropagates ``loss * grad_weight`` (default ``1 / accumulations``: the gradients averaged).
    ``optimizer``: a fused Adam/AdamW (the only ones that skip a step on a device flag).

    ``ddp``: the DDP-wrapped model the loss runs, if any (its all-reduce is skipped on all micro-steps but
    the last, and the ranks agree on skipping a step). ``max_graphs``: how many batch signatures (text
    lengths, say: the public data pads captions to the longest of the batch) x (last micro-step or not)
    get a graph, each with its own input buffers (~30 MB for the 256x256 model at batch 16 with 128
    tokens of width 2048); others run eagerly. Under DDP only the first step's are captured (all ranks
    capture then, together): a capture on one rank alone, whose warm-up runs DDP's collectives, would
    desynchronise the ranks; an eager micro-step runs the same collectives as a replay.

    ``eager_on_error``: a failed capture is logged and the step runs eagerly, with the same logic,
    instead of raising. ``capture=False`` runs the same logic without a graph (on a CPU, in tests).
    """

    def __init__(self, params: List[Tensor], optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 generator: torch.Generator, accumulations: int, max_grad_norm: float, capture: bool,
                 ddp: Optional[nn.Module] = None, eager_on_error: bool = False, max_graphs: int = 32,
                 grad_weight: Optional[float] = None):
        if not (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")):
            raise ValueError("graphed training needs torch.optim.Adam/AdamW(..., fused=True) (it skips a step with a "
                             f"non-finite loss on the device), got {type(optimizer).__name__} "
                             f"fused={optimizer.defaults.get('fused')}")
        self.params, self.optimizer, self.loss_fn = params, optimizer, loss_fn
        self.accumulations, self.max_grad_norm, self.ddp = accumulations, max_grad_norm, ddp
        self.grad_weight = 1.0 / accumulations if grad_weight is None else grad_weight
        self._sums: Dict[str, Tensor] = {}  # loss and per-level losses of this step, over its micro-batches
        # graphs (one per batch signature and per all-reduce or not) share one memory pool: they run one at
        # a time and keep nothing in it (gradients and sums live outside), so activations are reserved once
        self._sync_forwards = 0  # forwards run so far (eagerly) that all-reduce under DDP
        self.runner = GraphedCallable(self._micro, warmup=2, capture=capture,
                                      clone_outputs=False, generators=(generator,), before_warmup=self._save,
                                      after_warmup=self._restore,
                                      max_graphs=max_graphs if ddp is None else min(accumulations, 2),
                                      pool=torch.cuda.graph_pool_handle() if capture else None,
                                      eager_on_error=eager_on_error)
        self._saved: Optional[Tuple[List[Optional[Tensor]], Dict[str, Tensor]]] = None

    @property
    def eager_calls(self) -> int:
        """Micro-steps that ran eagerly because their shapes differed from the captured ones."""
        return self.runner.eager_calls

    def micro_step(self, *inputs: Tensor, last: bool = True) -> None:
        """One micro-batch; ``last``: the step's last one (under DDP the one that all-reduces)."""
        if self.ddp is not None:  # a capture met now runs after enough all-reducing forwards
            self.runner.warmup = max(2, DDP_TIMED_FORWARDS - self._sync_forwards) if last else 2
        self.runner(last, *inputs)

    def update(self) -> Tuple[Dict[str, Tensor], Tensor]:
        """Clip, step, zero the gradients: (stats as 0-dim device tensors, ok: 1.0, or 0.0 where the
        loss or the gradient norm was not finite and the optimizer skipped the step)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        skipped = (~(torch.isfinite(self._sums["loss"]) & torch.isfinite(norm))).float()  # (), 1.0 = skip
        if self.ddp is not None:  # a rank's non-finite loss skips the step on every rank
            torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
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

    def _micro(self, last: bool, *inputs: Tensor) -> None:
        self._sync_forwards += last  # counted on the host: a replay runs none of this
        with grad_sync(self.ddp, last):
            loss, stats = self.loss_fn(*inputs)
            (loss * self.grad_weight).backward()
        for k, v in [("loss", loss)] + [(k, v) for k, v in stats.items() if k.startswith("loss_level")]:
            v = v.detach().float() / self.accumulations
            if k in self._sums:
                self._sums[k].add_(v)
            else:  # first (eager or warm-up) run: the buffer the graph then accumulates into
                self._sums[k] = v.clone()

    def _save(self) -> None:
        """Before the warm-up runs of a new capture (possibly mid-step): the gradients and sums so far."""
        self._saved = ([None if p.grad is None else p.grad.clone() for p in self.params],
                       {k: v.clone() for k, v in self._sums.items()})

    def _restore(self) -> None:
        """After them: the gradients and sums as they were (zero where the warm-up created them)."""
        if self._saved is None:  # already restored (a capture that failed after its warm-up)
            return
        grads, sums = self._saved
        for p, g in zip(self.params, grads):
            if p.grad is not None and g is not None:
                p.grad.copy_(g)
            elif p.grad is not None:
                p.grad.zero_()
        for k, v in self._sums.items():
            if k in sums:
                v.copy_(sums[k])
            else:
                v.zero_()
        self._saved = None
