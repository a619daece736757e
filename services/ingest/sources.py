"""Where MovieLens files come from: a directory, a .zip, or a URL (downloaded, verified)."""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Protocol
from urllib.parse import urlparse

import httpx

from services.ingest.errors import IngestError

DOWNLOAD_TIMEOUT = httpx.Timeout(30.0, read=120.0)


class SourceFiles(Protocol):
    """A set of named files, opened as binary streams."""

    description: str

    def names(self) -> list[str]: ...

    def open(self, name: str) -> IO[bytes]: ...

    def size(self, name: str) -> int: ...


class DirectoryFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def names(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def open(self, name: str) -> IO[bytes]:
        try:
            return (self.root / name).open("rb")
        except OSError as error:
            raise IngestError(f"{self.root / name}: cannot be read: {error.strerror}") from None

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size


class ZipFiles:
    """Members of a zip archive, streamed without extracting to disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise IngestError(
                f"{path}: not a readable zip archive ({error}); the file may be truncated"
            ) from None

    def names(self) -> list[str]:
        return sorted(i.filename for i in self.archive.infolist() if not i.is_dir())

    def open(self, name: str) -> IO[bytes]:
        try:
            return _CheckedZipStream(self.archive.open(name), self.path, name)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise IngestError(f"{self.path}!{name}: cannot be read ({error})") from None

    def size(self, name: str) -> int:
        return self.archive.getinfo(name).file_size


class _CheckedZipStream:
    """Turns a damaged member's read errors into an IngestError naming the archive."""

    def __init__(self, stream: IO[bytes], path: Path, name: str) -> None:
        self.stream, self.where = stream, f"{path}!{name}"

    def _guard(self, call, *args):  # type: ignore[no-untyped-def]
        try:
            return call(*args)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise IngestError(
                f"{self.where}: damaged archive member ({error}); the zip may be truncated"
            ) from None

    def read(self, size: int = -1) -> bytes:
        return self._guard(self.stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._guard(self.stream.readline, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return self._guard(self.stream.readlines, hint)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> _CheckedZipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def _published_md5(url: str, client: httpx.Client) -> str | None:
    """GroupLens publishes `<archive>.md5` beside each archive; None where there is none."""
    try:
        response = client.get(url + ".md5")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    match = re.search(r"\b[0-9a-fA-F]{32}\b", response.text)
    return match.group(0).lower() if match else None


def download(url: str, downloads: Path) -> Path:
    """Download `url` into `downloads`, verified against the published MD5 where one exists."""
    downloads.mkdir(parents=True, exist_ok=True)
    name = PurePosixPath(urlparse(url).path).name or "download.zip"
    target = downloads / name
    partial = target.with_suffix(target.suffix + ".part")
    with httpx.Client(timeout=DOWNLOAD_TIMEOUT, follow_redirects=True) as client:
        expected = _published_md5(url, client)
        if target.exists() and expected and _md5(target) == expected:
            return target
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise IngestError(f"{url}: download failed with HTTP {response.status_code}")
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as error:
            partial.unlink(missing_ok=True)
            raise IngestError(f"{url}: download failed ({error})") from None
    if expected and digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise IngestError(
            f"{url}: checksum mismatch: MD5 {digest.hexdigest()}, published {expected}"
        )
    shutil.move(partial, target)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def open_source(source: str, downloads: Path) -> Iterator[SourceFiles]:
    """The files of a source given as a directory, a .zip path or an http(s) URL."""
    if is_url(source):
        source = str(download(source, downloads))
    path = Path(source).expanduser()
    if not path.exists():
        raise IngestError(f"{source}: no such file or directory")
    if path.is_dir():
        yield DirectoryFiles(path)
        return
    zipped = ZipFiles(path)
    try:
        yield zipped
    finally:
        zipped.archive.close()
