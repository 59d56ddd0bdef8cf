"""Files written atomically: the content goes to a temporary file in the target's folder, is flushed
and fsynced, then ``os.replace``-d over the target, so a crash or Ctrl-C leaves either the old file or
the new one, never half of one (checkpoints, images, grids, configs, logs)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a binary temporary file, then move it to ``path`` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))


def save_image_atomic(image, path: Union[str, Path]) -> Path:
    """A PIL image saved in the format its suffix names (``.png``, ``.jpg``, ...)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix; expected one of .png, .jpg, .webp, ...")
    return write_atomic(path, lambda f: image.save(f, format=fmt))
