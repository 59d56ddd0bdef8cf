"""Deterministic, resumable, sharded loading.

The sample order is a pure function of (seed, position): epoch ``e`` is ``randperm(N)`` seeded with
``seed * 1_000_003 + e`` (seed s + 1 does not replay seed s's epochs shifted by one), and the sample at
``position`` is read with the seed ``seed * 1_000_003 + position`` (its random crop). At optimizer step
``k`` the global batch is positions ``[k*G, (k+1)*G)`` with ``G = batch_size * world_size * accumulations``,
cut into ``world_size * accumulations`` shards of ``batch_size``; shard ``rank * accumulations + micro``
goes to that rank's micro-batch. So the data position is the step number times G (resume = start the
sampler there), and one process with ``accumulations = world_size * A`` reads exactly the shards that
``world_size`` processes read. A run resumed with another G starts at the position its checkpoint
reached (``start_position``), then goes on in steps of the new G.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mdm_fast.data.datasets import SampleDataset


def derived_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` (an epoch, a sample position, a sampling batch) of a run seeded with
    ``seed``: no two (seed, index) pairs with fewer than a million indices share one, so seed s + 1 does not
    replay seed s's items shifted by one."""
    return (seed * 1_000_003 + index) % (1 << 63)


class ShardedSampler(Sampler):
    """Yields ``(index, seed)`` items in the order one rank consumes them, from ``start_step`` on, whose
    global batch starts at ``start_position`` (default: ``start_step`` global batches in)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 accumulations: int = 1, seed: int = 0, start_step: int = 0, num_steps: int = -1,
                 start_position: Optional[int] = None):
        if num_samples < 1:
            raise ValueError("dataset is empty")
        self.n, self.b, self.rank, self.world, self.acc = num_samples, batch_size, rank, world_size, accumulations
        self.seed, self.start_step, self.num_steps = seed, start_step, num_steps
        self.start_position = start_step * batch_size * world_size * accumulations if start_position is None \
            else start_position
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[position % self.n]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        global_batch = self.b * self.world * self.acc
        start = self.start_position  # of the global batch of each step from start_step on
        while self.num_steps < 0 or start < self.start_position + self.num_steps * global_batch:
            for micro in range(self.acc):
                first = start + (self.rank * self.acc + micro) * self.b
                for pos in range(first, first + self.b):
                    yield self._index(pos), derived_seed(self.seed, pos)
            start += global_batch

    def __len__(self):
        return self.num_steps * self.b * self.acc if self.num_steps >= 0 else 1 << 62


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack images (uint8 (B, H, W, 3)), labels (B,), captions and their token ids (lists), text embeddings
    padded to the longest with a mask; ``_skipped`` sums the unreadable samples that were replaced."""
    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"images of different shapes in one batch: {sorted(shapes)}; set reader_config.image_size")
    out: Dict[str, Any] = {"image": torch.from_numpy(np.stack([s["image"] for s in samples]))}
    out["_skipped"] = sum(int(s.get("_skipped", 0)) for s in samples)
    if all("label" in s for s in samples):
        out["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if all("caption" in s for s in samples):
        out["caption"] = [s["caption"] for s in samples]
    if all("caption_ids" in s for s in samples):
        out["caption_ids"] = [s["caption_ids"] for s in samples]
    if all("text_embedding" in s for s in samples):
        embs = [np.asarray(s["text_embedding"], np.float32).reshape(-1, np.shape(s["text_embedding"])[-1])
                for s in samples]
        t = max(e.shape[0] for e in embs)
        emb = torch.zeros(len(embs), t, embs[0].shape[1])
        mask = torch.zeros(len(embs), t)
        for i, e in enumerate(embs):
            emb[i, : e.shape[0]] = torch.from_numpy(e)
            mask[i, : e.shape[0]] = torch.from_numpy(np.abs(e).sum(-1) > 0)  # stored all-zero rows: padding
        out["text_embedding"], out["text_mask"] = emb, mask
    return out


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker ignores SIGINT and SIGTERM: the trainer stops after the step under way on them, and
    the signal reaches the workers too (a terminal's Ctrl-C, torchrun's and schedulers' forwarding to the
    process group), where it killed them and failed that step. The main process ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(iterator) -> None:
    """End a loader iterator's workers now. A persistent worker's shutdown would otherwise wait for the
    garbage collector, and at interpreter exit multiprocessing ends workers with SIGTERM, which they
    ignore (:func:`ignore_stop_signals`)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # PyTorch's multi-process iterator
    if shutdown is not None:
        shutdown()


def make_loader(dataset: SampleDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                accumulations: int = 1, seed: int = 0, start_step: int = 0, num_steps: int = -1,
                num_workers: int = 0, pin_memory: bool = False, prefetch_batches: int = 4,
                start_position: Optional[int] = None) -> DataLoader:
    """A DataLoader of micro-batches in training order (``num_steps`` optimizer steps, -1: endless; see
    :class:`ShardedSampler` for ``start_position``)."""
    sampler = ShardedSampler(len(dataset), batch_size, rank, world_size, accumulations, seed, start_step, num_steps,
                             start_position)
    workers = max(0, min(num_workers, (os.cpu_count() or 1)))
    kwargs: Dict[str, Any] = {}
    if workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": max(2, min(8, prefetch_batches // workers)),
                  "worker_init_fn": ignore_stop_signals}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, **kwargs)
