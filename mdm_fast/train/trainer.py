"""The training loop (the public ``trainer.train_batch`` + ``clis/train_parallel.py`` semantics).

AdamW (weight decay 0, eps 1e-8) or Adam, linear warm-up then a constant rate (the public
``LRScaler``), gradient accumulation (averaged, ``loss_factor`` applied, with ``fp16`` set; summed
without: :func:`loss_scales`), gradient-norm clipping, bf16 autocast on CUDA when ``fp16`` is set, EMA,
JSONL/PNG logging, periodic sample grids, atomic checkpoints, exact resume, and torchrun DDP/FSDP.
Every random draw of a training step comes from a generator seeded by (seed, step, shard), so a resumed
run, or a run split over more processes with the same shards, computes the same numbers.

On one CUDA process (``cuda_graphs: auto``) the step's forward and backward are replayed from a CUDA
graph and nothing is read back to the host per step (:mod:`mdm_fast.train.graphed_step`): losses and
gradient norms reach the log once per ``log_freq`` steps. Otherwise the step runs eagerly.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mdm_fast.config import ExperimentConfig
from mdm_fast.data import build_dataset, close_loader, make_loader, to_model_range
from mdm_fast.models.cast_weights import CastEachCall
from mdm_fast.text import build_text_encoder, drop_conditioning, encodes_prompts
from mdm_fast.train import checkpoint as ckpt_io
from mdm_fast.train.distributed import (DistInfo, any_rank, barrier, check_ranks_agree, full_model_state,
                                        full_optimizer_state, grad_sync, init_distributed, sum_over_ranks, unwrap,
                                        wrap_model)
from mdm_fast.train.ema import ModelEma
from mdm_fast.train.graphed_step import GraphedMicroSteps
from mdm_fast.train.metrics import MetricsLog, plot_loss

log = logging.getLogger(__name__)


def build_network(cfg: ExperimentConfig, text_dim: int, device: Optional[torch.device] = None) -> nn.Module:
    """The denoising model of ``cfg`` (``impl``: "reference" = the pure-PyTorch oracle; other values are
    the fast model's backend choice, ``mdm_fast.build_model(..., impl=...)``: same state_dict either way).
    The fast model is channels_last on CUDA (where cuDNN runs NHWC convolutions; on CPU NCHW is about 10%
    faster for the demo model), except under ``distributed: fsdp`` (FSDP2 shards contiguous parameters
    only), whatever the world size, so that one config computes the same numbers on any number of
    processes."""
    unet = cfg.unet_dict(text_dim)
    if cfg.impl == "reference":
        from mdm_fast.reference import build_model
        model = build_model(cfg.model, unet)
    else:
        import mdm_fast

        on_cuda = device is not None and torch.device(device).type == "cuda"
        model = mdm_fast.build_model(cfg.model, unet, impl=cfg.impl,
                                     channels_last=on_cuda and cfg.distributed != "fsdp")
    return model.to(device) if device is not None else model


def build_diffusion(cfg: ExperimentConfig, model: nn.Module):
    from mdm_fast.diffusion import NestedDiffusion

    return NestedDiffusion.for_model(cfg.diffusion_config, unwrap(model))


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """The public LRScaler: linear from 1/warmup to 1 over ``warmup_steps``, then constant."""
    def f(step: int) -> float:
        step = max(1, step)
        return step / max(1, warmup_steps) if step < warmup_steps else 1.0
    return f


def loss_scales(cfg: ExperimentConfig) -> Tuple[float, float]:
    """(factor on the loss, weight of a micro-batch's loss in the gradient) of the public ``train_batch``
    branch that ``fp16`` picks: the bf16 one multiplies the loss by ``loss_factor`` and divides it by
    ``num_gradient_accumulations`` before backward (micro-batch gradients averaged); the fp32 one does
    neither (its division comes after backward: gradients summed, ``loss_factor`` unused)."""
    if cfg.fp16:
        return cfg.loss_factor, 1.0 / cfg.num_gradient_accumulations
    return 1.0, 1.0


def step_seed(seed: int, step: int, shard: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + shard) % (1 << 62)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _py_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state():
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """``Trainer(cfg).train()`` trains ``cfg`` in ``cfg.output_dir``, resuming from its newest good
    checkpoint. ``train(stop_after=N)`` stops after N steps of this call (for tests and budgets)."""

    def __init__(self, cfg: ExperimentConfig, device: Optional[torch.device] = None, quiet: bool = False,
                 graphed: Optional[bool] = None):
        """``graphed``: overrides ``cfg.cuda_graphs`` (True runs the graphed step's logic without a graph
        on a CPU, for tests)."""
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(graph_safe=cfg.cuda_graphs == "on" and cfg.distributed == "ddp")
        if device is None:
            device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda":  # as the public trainer
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.quiet = quiet or not self.dist.is_main
        self.out = Path(cfg.output_dir)
        self.dataset = build_dataset(cfg.file_list, cfg.reader_config, cfg.video_frames)  # fail fast on bad data
        self.skipped = 0  # images skipped in the whole run, every rank's (_sync_skipped)
        self._new_skips = 0  # this rank's, not yet counted there
        self.seed = cfg.seed if cfg.seed >= 0 else self._shared_time_seed()
        resume = ckpt_io.load_latest(self.out, set_aside=self.dist.is_main)
        if resume is not None:
            self.seed = int(resume[1].get("seed", self.seed))
            self.skipped = int(resume[1].get("skipped_images", 0))
        else:
            _check_start_files(cfg)
        torch.manual_seed(self.seed)
        self.encoder = build_text_encoder(cfg, self.device)
        self.dataset.tokenize = self.encoder.caption_tokenizer()  # in the workers; drops over max_token_length
        self.dataset.check = self.encoder.sample_check()  # a sample without what the model needs is skipped
        self.model = build_network(cfg, self.encoder.embed_dim, self.device)
        self.diffusion = build_diffusion(cfg, self.model)
        _check_video_frames(cfg, self.diffusion)
        unwrap(self.model).check_image_size(cfg.image_size)  # reader_config.image_size, before any file
        self.ema = ModelEma(self.model, cfg.ema_decay, cfg.ema_warmup_steps)
        self.dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.modules())
        if cfg.sample_freq and not encodes_prompts(self.encoder):
            raise ValueError(f"sample_freq: {type(self.encoder).__name__} cannot encode prompts for the periodic "
                             "sample grids (precomputed text embeddings); set sample_freq: 0")
        self.step = 0
        self.global_batch = cfg.batch_size * self.dist.world_size * cfg.num_gradient_accumulations
        self._start = (0, 0)  # (step, samples seen) where this run started
        if resume is not None:
            self._restore_weights(*resume)
        elif cfg.pretrained_vision_file:  # the public way to start from a checkpoint: weights and batch_num
            path = Path(cfg.pretrained_vision_file)
            self._restore_weights(path, ckpt_io.load_checkpoint(path), model_from_ema=cfg.resume_from_ema)
        check_ranks_agree(self.dist, resume_step=self.step, samples_seen=self.samples_seen,
                          dataset_length=len(self.dataset), seed=self.seed)
        # FSDP replaces the parameters by shards, so the optimizer is built on the wrapped model
        self.wrapped = wrap_model(self.model, self.dist, cfg.distributed,
                                  for_capture=cfg.cuda_graphs == "on" and self.device.type == "cuda")
        # one process: the weights cast in one pass, not per layer. Not under DDP/FSDP: every gradient
        # would reach its parameter at the very end of backward, leaving no all-reduce to overlap
        dtype = autocast_dtype(cfg, self.device) if self.dist.world_size == 1 else None
        self.step_model = self.wrapped if dtype is None else CastEachCall(self.wrapped, self.model, dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # (sharded under FSDP)
        if not self.params:
            raise ValueError("no trainable parameters (is every level frozen?)")
        graphed = self._graphed_wanted() if graphed is None else graphed
        opt_cls = torch.optim.AdamW if cfg.use_adamw else torch.optim.Adam
        opt_kwargs = {"weight_decay": 0.0} if cfg.use_adamw else {}
        if graphed:
            opt_kwargs["fused"] = True  # skips a step on a device flag
        self.optimizer = opt_cls(self.params, lr=cfg.lr, eps=1e-8, **opt_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(cfg.warmup_steps))
        if resume is not None:
            self._restore_training_state(*resume)
        self.generator = torch.Generator(self.device)  # re-seeded per micro-batch (step_seed)
        self.loss_factor, self.grad_weight = loss_scales(cfg)
        self.graphed: Optional[GraphedMicroSteps] = None
        if graphed:
            self.graphed = GraphedMicroSteps(self.params, self.optimizer, self._loss, self.generator,
                                             cfg.num_gradient_accumulations, cfg.gradient_clip_norm,
                                             capture=self.device.type == "cuda",
                                             ddp=self.wrapped if self.dist.world_size > 1 else None,
                                             eager_on_error=cfg.cuda_graphs == "auto",
                                             grad_weight=self.grad_weight)
        if self.graphed is None:
            kind = f"eager (cuda_graphs: {cfg.cuda_graphs}, {self.device.type}, {self.dist.world_size} process(es))"
        elif self.graphed.runner.capture:
            kind = "CUDA graphs (one per batch shape), nothing read back per step"
        else:
            kind = "graphed logic without capture"
        if not self.quiet:
            log.info("training step: %s", kind)

    def _graphed_wanted(self) -> bool:
        """``cuda_graphs``: auto = on for one process on a CUDA device; on = also DDP ranks (capture with
        NCCL collectives: run with one rank on an H200, not yet with several), or an error."""
        mode, why = self.cfg.cuda_graphs, None
        if self.device.type != "cuda":
            why = f"the device is {self.device}"
        elif self.dist.world_size > 1 and self.cfg.distributed != "ddp":
            why = f"distributed: {self.cfg.distributed} (FSDP steps run eagerly)"
        if mode == "on" and why is not None:
            raise ValueError(f"cuda_graphs: on needs one process or DDP on a CUDA device, but {why}; "
                             "use auto or off")
        return mode == "on" or (mode == "auto" and why is None and self.dist.world_size == 1)

    def _shared_time_seed(self) -> int:
        """seed: -1 (public): a seed from the clock, the same on every rank."""
        seed = torch.tensor([int(time.time()) % 10000], device=self.device)  # NCCL needs device tensors
        if self.dist.world_size > 1:
            torch.distributed.broadcast(seed, src=0)
        return int(seed.item())

    # ---- checkpoints -------------------------------------------------------------------------
    def _sync_skipped(self) -> None:
        """Every rank's images skipped since the last call, added to the run's count (a collective)."""
        self.skipped += round(sum_over_ranks([self._new_skips], self.dist)[0])
        self._new_skips = 0

    def checkpoint_dict(self) -> Dict[str, Any]:
        """The checkpoint (a collective: call it on every rank; full on rank 0 under FSDP)."""
        self._sync_skipped()
        return {
            "state_dict": full_model_state(self.model),  # public: torch.load(f)["state_dict"]
            "ema_state_dict": self.ema.module.state_dict(),
            "ema": self.ema.extra_state(),
            "optimizer": full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "batch_num": self.step,  # the public name of the step counter
            "step": self.step,
            "seed": self.seed,
            "skipped_images": self.skipped,  # metrics.jsonl's count goes on after a resume
            "samples_seen": self.samples_seen,  # the data position: a resume with another global batch goes on
            "rng": rng_state(),
            "model": self.cfg.model,
            "config": self.cfg.to_yaml(),
            "text_dim": self.encoder.embed_dim,
            "format": ckpt_io.FORMAT,
        }

    @property
    def samples_seen(self) -> int:
        """Samples of the data order consumed: where the next step's global batch starts."""
        return self._start[1] + (self.step - self._start[0]) * self.global_batch

    def save(self) -> Optional[Path]:
        state, path = self.checkpoint_dict(), None
        if self.dist.is_main:
            path = ckpt_io.save_rotating(state, self.out, self.step, self.cfg.keep_checkpoints)
        barrier(self.dist)
        return path

    def _restore_weights(self, path: Path, ckpt: Dict[str, Any], model_from_ema: bool = False) -> None:
        """The model, EMA and step of ``ckpt``. A checkpoint without EMA weights (a converted public
        file holds the public EMA as its ``state_dict``) starts the EMA from its weights; with
        ``model_from_ema`` (``resume_from_ema``) the model starts from the EMA weights too."""
        ema = ckpt.get("ema_state_dict")
        ckpt_io.load_weights(self.model, ema if model_from_ema and ema is not None else ckpt["state_dict"], path)
        if ema is not None:
            ckpt_io.load_weights(self.ema.module, ema, path)
            self.ema.set_count(int(ckpt.get("ema", {}).get("counter", 0)))
        else:
            ckpt_io.load_weights(self.ema.module, ckpt["state_dict"], path)
            if not self.quiet:
                log.info("%s has no EMA weights: the EMA starts from its weights", path)
        self.step = int(ckpt.get("step", ckpt.get("batch_num", 0)))
        self._start = (self.step, int(ckpt.get("samples_seen", self.step * self.global_batch)))
        if not self.quiet:
            log.info("weights from %s (step %d)", path, self.step)

    def _restore_training_state(self, path: Path, ckpt: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if "optimizer" in ckpt:
            set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self._keep_optimizer_kind()
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self._apply_config_lr()
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        if not self.quiet:
            log.info("resumed from %s at step %d", path, self.step)

    def _apply_config_lr(self) -> None:
        """The config's ``lr`` over the checkpoint's: a resumed run with a new ``lr=`` trains at it (the
        warm-up's progress is kept)."""
        old = self.scheduler.base_lrs[0]
        if old == self.cfg.lr:
            return
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if not self.quiet:
            log.info("lr: %g (the config) replaces the checkpoint's %g", self.cfg.lr, old)

    def _keep_optimizer_kind(self) -> None:
        """A checkpoint's param groups carry the implementation flags of the run that wrote it (fused
        or not); this run keeps its own, and its step counters are placed for them again (a fused
        optimizer wants them on the device) by a round trip through torch's own state-dict loader."""
        defaults = self.optimizer.defaults
        kind = {k: defaults[k] for k in ("fused", "foreach", "capturable") if k in defaults}
        if all(group.get(k) == v for group in self.optimizer.param_groups for k, v in kind.items()):
            return
        for group in self.optimizer.param_groups:
            group.update(kind)
        self.optimizer.load_state_dict(self.optimizer.state_dict())

    # ---- one optimizer step ------------------------------------------------------------------
    def _autocast(self):
        dtype = autocast_dtype(self.cfg, self.device)
        return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    def _conditioning(self, batch, generator):
        cond, mask = self.encoder.encode_batch(batch, self.device)
        p = self.cfg.cond_drop_prob
        if p > 0:  # classifier-free guidance training: some samples see the null conditioning
            drop = (torch.rand(cond.shape[0], generator=generator, device=self.device) < p)
            cond, mask = drop_conditioning(self.encoder, cond, mask, drop)
        return cond, mask

    def _all_finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if self.dist.world_size > 1:  # every rank must agree, or DDP's all-reduce would hang
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def precompile(self, batch) -> None:
        """Compile the Triton kernels of a training step's forward and backward in parallel before the
        first step (:func:`mdm_fast.engine.precompile_training`): one CUDA process only (the dry run
        uses the unwrapped model, no DDP/FSDP collectives); the model, optimizer and data order are
        untouched."""
        if self.device.type != "cuda" or self.dist.world_size > 1:
            return
        from mdm_fast.engine.precompile import precompile_training

        gen = torch.Generator(self.device).manual_seed(0)
        images = to_model_range(batch["image"].to(self.device))

        def loss():
            with self._autocast():
                cond, mask = self._conditioning(batch, gen)
                return self.diffusion.loss(self.model, images, cond, mask, generator=gen)[0]

        stats = precompile_training(loss, list(self.model.parameters()))
        if stats is not None and stats.kernels:
            log.info("training: %s", stats)

    def _loss(self, images, cond, mask):
        """(loss times the public factor (:func:`loss_scales`), stats) of one micro-batch, noise from
        ``self.generator``."""
        with self._autocast():
            loss, stats = self.diffusion.loss(self.step_model, images, cond, mask, generator=self.generator)
            return loss * self.loss_factor, stats

    def _micro_inputs(self, batch, micro: int):
        """Re-seed the step's generator for this micro-batch (and the global generators the dropout layers
        draw from, where there are any: the ranks drew the same masks); (images, cond, mask) on the device."""
        acc = self.cfg.num_gradient_accumulations
        seed = step_seed(self.seed, self.step, self.dist.rank * acc + micro)
        self.generator.manual_seed(seed)
        if self.dropout:
            torch.manual_seed(seed)
        # the (pinned) uint8 batch crosses to the device, then is converted there: a quarter of the bytes,
        # and an asynchronous copy (the float32 tensor made on the host would be pageable)
        images = to_model_range(batch["image"].to(self.device, non_blocking=True))
        with torch.no_grad(), self._autocast():
            cond, mask = self._conditioning(batch, self.generator)
        self._new_skips += int(batch.get("_skipped", 0))
        return images, cond, mask

    def train_step(self, batches) -> Tuple[Dict[str, Any], Any]:
        """One optimizer step over ``batches`` (the micro-batches): (stats, ok). ok is 1.0, or 0.0 where
        the loss or the gradient norm was not finite and the update was skipped (the step still counts, as in the public
        trainer); on the graphed path ok and the stats are device tensors (read at log time)."""
        self.wrapped.train()
        if self.graphed is not None:
            return self._graphed_step(batches)
        cfg, acc = self.cfg, self.cfg.num_gradient_accumulations
        totals: Dict[str, float] = {}
        for micro, batch in enumerate(batches):
            images, cond, mask = self._micro_inputs(batch, micro)
            with grad_sync(self.wrapped, micro == acc - 1):  # backward inside: FSDP2 reads the flag there
                loss, stats = self._loss(images, cond, mask)
                if not self._all_finite(loss):  # as the public trainer: skip the update, keep counting
                    return self._skip_update("loss")
                (loss * self.grad_weight).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / acc
            for k, v in stats.items():
                if k.startswith("loss_level"):
                    totals[k] = totals.get(k, 0.0) + float(v) / acc
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.gradient_clip_norm)
        totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(totals["grad_norm"]):  # the same on every rank: gradients are all-reduced
            return self._skip_update("gradient norm")
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        return totals, 1.0

    def _skip_update(self, what: str) -> Tuple[Dict[str, Any], float]:
        """A step whose ``what`` is not finite: no update and no EMA update, the step and the learning-rate
        schedule still advance (the public trainer's NaN-loss rule; its fp16 GradScaler also skips a step
        with non-finite gradients, which ours does in every precision)."""
        log.warning("step %d: %s is not finite; skipping the update", self.step, what)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"loss": float("nan")}, 0.0

    def _graphed_step(self, batches) -> Tuple[Dict[str, Any], Any]:
        last = len(batches) - 1
        for micro, batch in enumerate(batches):
            self.graphed.micro_step(*self._micro_inputs(batch, micro), last=micro == last)
        stats, ok = self.graphed.update()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.ema.update(self.model, skipped=1.0 - ok)
        self.step += 1
        return stats, ok

    def _stops_here(self, signalled: List[str], deadline: Optional[float]) -> bool:
        """A signal or the deadline on any rank stops every rank after this step (under torchrun, one
        host-side all-reduce per step: the ranks must stop together)."""
        return any_rank(bool(signalled) or (deadline is not None and time.time() > deadline), self.dist)

    # ---- the loop ----------------------------------------------------------------------------
    @contextmanager
    def _stop_on_signals(self) -> Iterator[List[str]]:
        """In the main thread, SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice) stops the run after
        the step under way, with a checkpoint; the yielded list names the signal once one came. One process:
        a second signal aborts. Under torchrun (any number of ranks) every rank stops at the same step
        (``_stops_here``), and a repeat is ignored: the launcher forwards the signal it got to ranks that may
        have had it already (a terminal's Ctrl-C, a scheduler's SIGTERM reach every process of the job), and
        kills them itself 30 s after forwarding."""
        received: List[str] = []
        if threading.current_thread() is not threading.main_thread():
            yield received
            return
        one = self.dist.world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ  # not under torchrun

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if received and one:
                raise KeyboardInterrupt(f"{name} again: aborted without a checkpoint of the step under way")
            if not received:
                log.warning("%s: stopping after this step with a checkpoint%s", name,
                            f" ({name} again aborts)" if one else " (every rank stops at that step)")
            received.append(name)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield received
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _loop(self, todo: int, it, bar, metrics, deadline: Optional[float], signalled: List[str],
              sample_fn) -> Tuple[Dict[str, Any], float]:
        cfg, total = self.cfg, self.cfg.num_training_steps
        window, last = _Window(), ({}, 1.0)
        for i in range(todo):
            batches = [next(it) for _ in range(cfg.num_gradient_accumulations)]
            if i == 0:
                self.precompile(batches[0])
            last = self.train_step(batches)
            window.add(*last)
            bar.update(1)
            saved = self.step % cfg.save_freq == 0 or self.step == total
            if saved:
                self.save()
            late = self._stops_here(signalled, deadline)
            stops = late or i == todo - 1  # the last step, stop_after's, the deadline's or a signal's
            if self.step % cfg.log_freq == 0 or stops:  # where it stops, it logs its window and saves
                self._log(window, metrics, bar)
                window = _Window()
            if stops and not saved:
                self.save()
            if late:
                break
            if cfg.sample_freq and self.step % cfg.sample_freq == 0 and self.dist.is_main:
                (sample_fn or periodic_samples)(self)
        return last

    def train(self, stop_after: Optional[int] = None, sample_fn: Optional[Callable[["Trainer"], None]] = None,
              deadline: Optional[float] = None) -> Dict[str, Any]:
        """Train until ``num_training_steps``, or ``stop_after`` more steps, or the wall-clock
        ``deadline`` (time.time() value), or a SIGINT / SIGTERM (see ``_stop_on_signals``);
        a checkpoint is written where it stops."""
        cfg = self.cfg
        total = cfg.num_training_steps
        todo = total - self.step
        if stop_after is not None:
            todo = min(todo, stop_after)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out / "config.yaml")
        metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step) if self.dist.is_main else None
        if todo <= 0:
            return {"step": self.step}
        loader = make_loader(self.dataset, cfg.batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
                             accumulations=cfg.num_gradient_accumulations, seed=self.seed, start_step=self.step,
                             start_position=self.samples_seen, num_steps=todo,
                             num_workers=cfg.reader_config.num_readers, pin_memory=self.device.type == "cuda",
                             prefetch_batches=min(cfg.reader_config.reader_buffer_size, 32))
        it = iter(loader)
        bar = tqdm(total=total, initial=self.step, desc="training", disable=self.quiet, dynamic_ncols=True)
        try:
            with self._stop_on_signals() as signalled:
                last = self._loop(todo, it, bar, metrics, deadline, signalled, sample_fn)
        finally:
            close_loader(it)
        bar.close()
        if metrics is not None:
            plot_loss(metrics.read(), self.out / "loss.png", title=f"{cfg.name or cfg.model}: training loss")
        barrier(self.dist)
        stats, ok = last
        return {"step": self.step, "last": {k: float(v) if float(ok) else float("nan") for k, v in stats.items()},
                "skipped_images": self.skipped}

    def _log(self, window: "_Window", metrics: Optional[MetricsLog], bar) -> None:
        """The window's means (one read of the device values) to metrics.jsonl and the progress bar."""
        means, skipped = window.means(self.dist)
        self._sync_skipped()
        if skipped:
            log.warning("steps %d-%d: %d updates skipped (loss or gradient norm not finite)",
                        self.step - window.steps + 1, self.step, skipped)
        if self.graphed is not None and self.graphed.eager_calls:
            log.warning("graphed training: %d micro-batches with new shapes ran eagerly", self.graphed.eager_calls)
        if not means:
            return
        bar.set_postfix(loss=f"{means['loss']:.4f}")
        if metrics is not None:
            cfg, seconds = self.cfg, max(1e-9, window.seconds())
            metrics.write({"step": self.step, "steps": window.steps, **means, "skipped_images": self.skipped,
                           "time_s": round(seconds, 3),
                           "images_per_s": round(window.steps * cfg.batch_size * cfg.num_gradient_accumulations
                                                 * self.dist.world_size / seconds, 2)})


class _Window:
    """Sums of the step stats since the last log line; device tensors stay on the device until
    :meth:`means` (one synchronisation per log line, not per step). A skipped step adds nothing."""

    def __init__(self):
        self.sums: Dict[str, Any] = {}
        self.kept: Any = 0.0
        self.steps = 0
        self.start = time.time()

    def add(self, stats: Dict[str, Any], ok: Any) -> None:
        self.steps += 1
        self.kept = self.kept + ok
        for k, v in stats.items():
            v = torch.where(ok > 0, v, 0.0) if isinstance(ok, torch.Tensor) else (v if ok else 0.0)
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self, info: DistInfo = DistInfo()) -> Tuple[Dict[str, float], int]:
        """(mean of each stat over the kept steps of every rank (a collective), number of skipped steps:
        the ranks skip together)."""
        keys = sorted(self.sums)
        *sums, kept = sum_over_ranks([float(self.sums[k]) for k in keys] + [float(self.kept)], info)
        means = {k: v / kept for k, v in zip(keys, sums)} if kept else {}
        return means, self.steps - round(kept / info.world_size)

    def seconds(self) -> float:
        return time.time() - self.start


def _check_start_files(cfg: ExperimentConfig) -> None:
    """A fresh run's weight files exist (the public code skips a missing one with a log line, training a
    random model that was meant to start from it)."""
    if cfg.pretrained_vision_file and not Path(cfg.pretrained_vision_file).is_file():
        raise ValueError(f"pretrained_vision_file: no file {cfg.pretrained_vision_file!r}")
    level, where = cfg.unet_config, "unet_config"
    while level is not None:
        path = getattr(level, "initialize_inner_with_pretrained", None)
        if path and not Path(path).is_file():
            raise ValueError(f"{where}.initialize_inner_with_pretrained: no file {path!r}")
        level, where = getattr(level, "inner_config", None), f"{where}.inner_config"


def _check_video_frames(cfg: ExperimentConfig, diffusion) -> None:
    """Clips tiled as the temporal model takes them: video_frames is its frame grid's n*n."""
    n = diffusion.frames_per_side
    if cfg.video_frames and any(diffusion.is_temporal) and cfg.video_frames != n * n:
        raise ValueError(f"video_frames: {cfg.video_frames}, but the model takes clips of {n * n} frames (a {n}x{n} "
                         f"grid, from its unet_config); set video_frames: {n * n}")


def autocast_dtype(cfg, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype the model trains and samples at: bfloat16 with ``fp16`` set on CUDA, else None (fp32)."""
    return torch.bfloat16 if cfg.fp16 and device.type == "cuda" else None


def periodic_samples(trainer: "Trainer", per_prompt: int = 4, steps: int = 50) -> Path:
    """A grid from the EMA model: the first classes (class models) or the first captions of the data."""
    from mdm_fast.text import ClassLabelEncoder
    from mdm_fast.train.grids import generate, save_grid

    if isinstance(trainer.encoder, ClassLabelEncoder):
        prompts = [str(i) for i in range(min(10, trainer.encoder.embed_dim))]
    else:
        prompts = [trainer.dataset[(i, i)].get("caption", "") for i in range(min(4, len(trainer.dataset)))]
    guidance = 2.0 if trainer.cfg.cond_drop_prob > 0 else 1.0
    levels = generate(trainer.diffusion, trainer.ema.module, trainer.encoder, prompts, per_prompt,
                      trainer.cfg.image_size, trainer.device, steps=steps, guidance=guidance, seed=0,
                      autocast=autocast_dtype(trainer.cfg, trainer.device))
    return save_grid(levels, trainer.out / "samples" / f"step_{trainer.step:08d}.png", len(prompts),
                     [p[:24] for p in prompts])
