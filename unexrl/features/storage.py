"""Logs and feature tables addressed by URI: a local path, file://, or object storage (s3://, gs://, ...).

pyarrow's filesystems do the I/O, so every reader and writer here takes the same kind of address.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from unexrl.contracts.files import MANIFEST
from unexrl.io import atomic_directory, atomic_file


def is_local(uri: str | Path) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def normalize(uri: str | Path) -> str:
    """An absolute local path for local addresses (what Feast sources and DuckDB expect), else the URI."""
    text = str(uri)
    text = text.removeprefix("file://")
    return str(Path(text).resolve()) if is_local(text) else text.rstrip("/")


def join(uri: str | Path, name: str) -> str:
    return f"{normalize(uri)}/{name}"


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for any supported address."""
    uri = normalize(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def write_parquet(table: pa.Table, uri: str | Path) -> None:
    """``table`` as Parquet at ``uri``, whole or not at all: locally through a temporary sibling and one rename; an
    object store makes an object visible only once its upload completes."""
    fs, path = filesystem(uri)
    if not is_local(uri):
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        return
    with atomic_file(Path(path)) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@contextmanager
def local_directory(uri: str | Path) -> Iterator[Path]:
    """The directory at ``uri`` as a local path: itself when local, else a temporary copy removed afterwards."""
    uri = normalize(uri)
    if is_local(uri):
        yield Path(uri)
        return
    fs, path = filesystem(uri)
    tmp = Path(tempfile.mkdtemp(prefix="unexrl-"))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def publish_directory(uri: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A local directory to fill; on success it becomes ``uri`` (a rename locally, an upload otherwise).

    Readers never see half a directory locally; remotely the caller writes its manifest last.
    """
    uri = normalize(uri)
    if is_local(uri):
        with atomic_directory(Path(uri), overwrite=overwrite) as tmp:
            yield tmp
        return
    fs, path = filesystem(uri)
    if not overwrite and fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        raise FileExistsError(f"{uri} exists and is not empty; choose another address or allow overwriting")
    tmp = Path(tempfile.mkdtemp(prefix="unexrl-"))
    try:
        yield tmp
        fs.create_dir(path, recursive=True)
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == MANIFEST):  # the manifest last
            with fs.open_output_stream(f"{path}/{file.name}") as dst:
                dst.write(file.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
