"""Atomic, verified checkpoints compatible with the public code.

A checkpoint is one ``torch.save`` file whose top level holds ``state_dict`` (the model, loadable with
``strict=True`` into the public model and ours) plus our extras (EMA, optimizer, scheduler, RNG
states, step). It is written to a temporary file in the same folder, flushed and fsynced, then
``os.replace``-d into place, so a crash leaves either the old file or the new one, never half of one.
The newest ``keep`` checkpoints are kept; :func:`load_latest` verifies each candidate, newest first,
and falls back to the previous good one, saying why, when a file is truncated or corrupt.
Everything stored loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mdm_fast.files import write_atomic

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
FORMAT = "mdm_fast.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that is truncated, corrupt or not a checkpoint."""


class CheckpointPickleError(CheckpointError):
    """A complete file that pickles Python objects besides tensors (public files pickle their args)."""


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    """(step, path) of the checkpoints in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := _NAME.match(p))]
    return sorted(found, reverse=True)


def save_atomic(obj: Dict[str, Any], path: Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + os.replace)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def _reason(e: Exception) -> str:
    """The informative line of a torch.load error (the unpickler's own, not its boilerplate)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class _Stub:
    """Stands in for a class of the public code that is not installed (its pickled ``args``)."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] in ("torch", "collections", "builtins", "numpy", "_codecs"):
            return super().find_class(module, name)
        return _Stub


class _StubPickle:
    Unpickler = _StubUnpickler
    load = staticmethod(pickle.load)
    __name__ = "stub_pickle"


def load_checkpoint(path: Path, map_location: Any = "cpu", trust_pickle: bool = False) -> Dict[str, Any]:
    """Load and verify one checkpoint; CheckpointError (naming the file) if it is unusable. A file that
    pickles Python objects besides tensors (the public trainer's ``args``) is refused unless
    ``trust_pickle``: then those objects are unpickled as stand-ins (the public code need not be installed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # garbage bytes fail here too
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_reason(e)})") from e
        if not trust_pickle:
            raise CheckpointPickleError(
                f"checkpoint {path} pickles Python objects besides tensors (a public checkpoint's 'args'?); "
                f"if you trust it, pass --trust-pickle (mdm-fast sample, convert), or convert it once for "
                f"training: mdm-fast convert {path} OUT.pt --to ours --trust-pickle") from e
        ckpt = _load_trusted(path, map_location)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_reason(e)}; "
                              f"size {path.stat().st_size} bytes)") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' mapping at the top level")
    return ckpt


def _load_trusted(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_StubPickle)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from e


def load_weights(module: torch.nn.Module, state: Dict[str, Any], source: Path) -> None:
    """``module.load_state_dict(state, strict=True)``; weights of another config are a ValueError naming
    ``source`` and the first mismatches."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        detail = "; ".join(line if len(line) < 200 else line[:200] + "..." for line in lines[:2])
        if state and all(k.startswith("module.") for k in state):
            hint = ("its keys start with 'module.' (saved from a DDP-wrapped model): strip that prefix "
                    "(torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, 'module.'))")
        else:
            hint = "check that the config (--config, overrides) is the one the weights were trained with"
        raise ValueError(f"{source}: its weights do not fit the model this config builds ({detail}); {hint}") from e


def load_latest(folder: Path, map_location: Any = "cpu", set_aside: bool = False
                ) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint in ``folder`` that loads; bad ones are reported and skipped, and with
    ``set_aside`` (one process of a run) renamed ``*.unreadable``: kept for inspection, no longer
    counted among the checkpoints that rotation keeps, nor loaded again."""
    for _, path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("%s; falling back to the previous checkpoint%s", e,
                        "; renamed *.unreadable" if set_aside else "")
            if set_aside:
                path.rename(path.with_name(path.name + ".unreadable"))
    return None


def save_rotating(obj: Dict[str, Any], folder: Path, step: int, keep: int = 2) -> Path:
    """Write ``ckpt_<step>.pt`` atomically, then drop all but the newest ``keep`` (>= 2: the previous
    good one is always kept) and the temporary files of writes a kill interrupted."""
    path = save_atomic(obj, checkpoint_path(folder, step))
    for _, old in list_checkpoints(folder)[max(2, keep):]:
        old.unlink(missing_ok=True)
    for torn in Path(folder).glob("ckpt_*.pt.*.tmp"):  # one writer per folder: none is being written now
        torn.unlink(missing_ok=True)
    return path
