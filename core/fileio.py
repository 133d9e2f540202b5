"""Atomic writes: every file the app writes goes to a temp file in the same folder, then is renamed.

A crash or a full disk therefore never leaves a half-written adapter, image, config or manifest.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync(tmp)  # the bytes are on disk before the name is: a crash right after never leaves an empty file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete what a killed process left half-written in `folder`: `.<name>.*.tmp` files and `.ckpt-*` folders."""
    folder = Path(folder)
    stale = [*folder.glob(".*.tmp"), *folder.glob(".ckpt-*")] if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def disk_error_message(e: OSError, where: str | Path) -> str | None:
    """Plain words for a full disk or an unwritable folder; None for other OS errors."""
    if e.errno in NO_SPACE:
        return (f"The disk is full: could not write in {where} ({e.strerror}). Free some space (or choose another output folder, "
                "output.dir), then resume the run.")
    if e.errno in READ_ONLY:
        return (f"Cannot write in {where} ({e.strerror}): choose an output folder you can write to (output.dir) "
                "or fix its permissions.")
    return None


def check_writable(folder: str | Path, need_bytes: int = 0) -> None:
    """Refuse now, before hours of work, a folder that cannot take a run's files (ConfigError in plain words)."""
    from .errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
        if need_bytes and free < need_bytes:
            raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MiB free, about {need_bytes / 2**20:.0f} MiB needed")
    except OSError as e:
        raise ConfigError(disk_error_message(e, folder) or f"Cannot use the output folder {folder} ({e.strerror or e}): "
                          "choose another one (output.dir).") from None


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=1))


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)
