"""Files on any fsspec URL (s3://, gs://, local paths): local copies of inputs, atomic outputs.

Credentials and endpoints come from the environment or fsspec config (for S3: the AWS_* variables including
AWS_ENDPOINT_URL, ~/.aws), or from `storage_options`; never from code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .media import MediaError


def is_local(url: str | Path) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def join(prefix: str, *parts: str) -> str:
    return "/".join([str(prefix).rstrip("/"), *parts])


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(str(url), **(storage_options or {}))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


class InputCache:
    """Local copies of remote inputs for decoders that need a file, in a per-process folder that keeps the
    `keep` most recently used files (chunks of one video arrive together, so a small cache suffices)."""

    def __init__(self, storage_options: dict[str, Any] | None = None, keep: int = 4):
        self.storage_options = storage_options
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="lipsync-inputs-"))
        self._recent: list[str] = []

    def local(self, url: str) -> str:
        """A local path holding `url`'s bytes; raises MediaError naming the URL when it cannot be read."""
        if is_local(url):
            path = str(url).removeprefix("file://")
            if not os.path.exists(path):
                raise MediaError(f"{url}: no such file")
            return path
        target = self.root / hashlib.sha1(url.encode()).hexdigest()[:16] / os.path.basename(url.rstrip("/"))
        if not target.exists():
            fs, path = filesystem(url, self.storage_options)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            try:
                fs.get_file(path, str(partial))
            except FileNotFoundError:
                raise MediaError(f"{url}: no such object") from None
            except Exception as err:  # permissions, network, bad bucket: one clear line per input
                raise MediaError(f"{url}: cannot be read ({type(err).__name__}: {err})") from None
            partial.rename(target)
        if url in self._recent:
            self._recent.remove(url)
        self._recent.append(url)
        for old in self._recent[: -self.keep]:
            shutil.rmtree(self.root / hashlib.sha1(old.encode()).hexdigest()[:16], ignore_errors=True)
        self._recent = self._recent[-self.keep :]
        return str(target)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def upload_atomic(local: str | Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Put a finished local file at `url` so that no partial object is ever visible there: object stores
    publish a PUT only when complete; local and POSIX-like targets get a temporary name and a rename."""
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
    else:
        fs.put_file(str(local), path)


def write_bytes_atomic(data: bytes, url: str, storage_options: dict[str, Any] | None = None) -> None:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        upload_atomic(f.name, url, storage_options)
    finally:
        os.unlink(f.name)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
