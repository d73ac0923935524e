"""Small file-system helpers: hashes, all-or-nothing writes and directory publishing, and guarded reads of files
that someone else may have put in place."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_parquet_hashed(path: Path) -> tuple[pa.Table, str]:
    """A Parquet file's table and the hex sha256 of the very bytes it was parsed from. Read once, so a file
    replaced while it is read cannot pass a recorded hash with other content, nor be used as other content than
    the hash vouches for. Raises OSError or pyarrow.ArrowException for the caller to name the file."""
    data = path.read_bytes()
    return pq.read_table(pa.BufferReader(data)), hashlib.sha256(data).hexdigest()


def check_publishable(out_dir: Path, overwrite: bool, what: str = "output directory") -> None:
    """Refuse to replace anything but an absent or empty directory unless ``overwrite``; say what and why."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{what} {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{what} {out_dir} exists and is not empty; refusing to overwrite it "
            "(allow overwriting to replace it, or choose another path)"
        )


@contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; on success it replaces ``out_dir`` in one rename.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was, so readers never
    see a half-written artifact.
    """
    out_dir = Path(out_dir)
    check_publishable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, target: Path) -> None:
    """Put the finished directory ``new`` at ``target`` (a sibling): ``target``, if present, is renamed aside, ``new``
    renamed in, and the old one deleted only then, so ``target`` is always one whole generation and is put back
    if the second rename fails."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling and one rename: readers see the old file or the whole new one."""
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` in one rename, on an exception
    it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``atomic_write_text`` for bytes; ``mode`` is the file's from its creation (0o600: never readable by others)."""
    with atomic_file(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


class UnreadableFile(ValueError):
    """A file refused before it is read: not a regular file, or larger than its reader allows."""


def read_regular_file(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes of ``path`` and the status of the very file they were read from, for a file that someone
    else may have put there: refused (UnreadableFile) if it is a symbolic link, not a regular file (a pipe or a
    device would block the reader or never end) or larger than ``limit`` bytes. OSError if there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnreadableFile(f"{path}: a symbolic link, not the file itself") from None
        raise
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise UnreadableFile(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFile(f"{path}: larger than {limit:,} bytes")
    return data, status


def write_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at ``path``, written whole or not at all (one rename); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
