"""Downloading files into the tipstorch cache: atomic, resumable, size- and checksum-verified.

The cache directory is ``$TIPSTORCH_CACHE`` (default ``~/.cache/tipstorch``). With
``TIPSTORCH_OFFLINE=1`` nothing is downloaded and a missing file is an error that names it.
A download goes to ``<name>.part``; an interrupted one resumes from there with an HTTP Range request,
and the file appears under its final name only once complete and verified.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched or did not verify."""


def cache_dir() -> Path:
    return Path(os.environ.get("TIPSTORCH_CACHE", Path.home() / ".cache" / "tipstorch")).expanduser()


def is_offline() -> bool:
    return os.environ.get("TIPSTORCH_OFFLINE", "").lower() in ("1", "true", "yes")


def cached_path_for(url: str) -> Path:
    """Where ``url`` is stored in the cache: ``<cache>/<host>/<path>``."""
    parts = urllib.parse.urlsplit(url)
    return cache_dir() / parts.netloc / parts.path.lstrip("/")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, start: int, timeout: float):
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # the partial file is already complete (or larger)
            return None
        raise DownloadError(f"cannot download {url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"cannot download {url}: {error}") from error


def _transfer(url: str, partial: Path, progress: bool, timeout: float) -> int | None:
    """Append the rest of ``url`` to ``partial``; returns the total size announced by the server."""
    start = partial.stat().st_size if partial.exists() else 0
    response = _open(url, start, timeout)
    if response is None:
        return None
    with response:
        resumed = response.status == 206
        if not resumed:
            start = 0  # the server ignored the Range header: start again
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as handle, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=Path(partial.name).stem,
            disable=not progress, leave=False,
        ) as bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    handle.write(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, OSError) as error:
                raise DownloadError(
                    f"download of {url} broke off after {handle.tell()} bytes ({error}); "
                    f"call again to resume from {partial}"
                ) from error
    return total


def download(
    url: str,
    destination: Path | None = None,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Return a local, verified copy of ``url``, downloading it if it is not cached yet.

    ``expected_size`` (bytes) and ``sha256`` are checked when given; the size announced by the server
    is always checked, so a truncated transfer is never taken for a complete file.
    """
    destination = Path(destination) if destination is not None else cached_path_for(url)
    if destination.exists():
        return destination
    if is_offline():
        raise DownloadError(
            f"{url} is not in the cache ({destination}) and TIPSTORCH_OFFLINE is set: "
            "copy the file there, or unset TIPSTORCH_OFFLINE to download it"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        announced = _transfer(url, partial, progress, timeout)
    except DownloadError as error:
        raise DownloadError(
            f"{error} (cache path: {destination}; without network copy the file there and set TIPSTORCH_OFFLINE=1)"
        ) from error.__cause__
    received = partial.stat().st_size
    for label, wanted in (("server-announced", announced), ("expected", expected_size)):
        if wanted is not None and received != wanted:
            raise DownloadError(
                f"download of {url} is incomplete: got {received} bytes, {label} size is {wanted} bytes; "
                f"call again to resume from {partial}"
            )
    if sha256 is not None:
        found = sha256_of(partial)
        if found != sha256:
            partial.unlink()
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {found}")
    os.replace(partial, destination)
    return destination


def resolve(path_or_url: str | os.PathLike) -> Path:
    """A local path for a file given as a path or an http(s) URL (downloaded to the cache)."""
    text = str(path_or_url)
    if text.startswith(("http://", "https://")):
        return download(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return path
