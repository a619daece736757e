"""Ingest from a URL: downloaded, verified against the published MD5 where one exists."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.ingest.errors import IngestError
from services.ingest.ingest import ingest_source
from tests.conftest import FIXTURES
from tests.ingest.helpers import db_state, zip_dataset


@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over a folder, as GroupLens serves its archives."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def pg(pg_url: str, use_settings) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url)
    return pg_url


def test_url_with_matching_md5(pg: str, web_root: tuple[Path, str]) -> None:
    root, base = web_root
    archive = zip_dataset(FIXTURES / "ml-1m", root / "ml-1m.zip")
    digest = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
    (root / "ml-1m.zip.md5").write_text(f"MD5 (ml-1m.zip) = {digest}\n")
    result = ingest_source(f"{base}/ml-1m.zip")
    assert (result.dataset, result.ratings) == ("ml-1m", 8)


def test_url_without_published_checksum(pg: str, web_root: tuple[Path, str]) -> None:
    root, base = web_root
    zip_dataset(FIXTURES / "ml-latest-small", root / "ml-latest-small.zip")
    assert ingest_source(f"{base}/ml-latest-small.zip").ratings == 6


def test_url_checksum_mismatch_is_refused(pg: str, web_root: tuple[Path, str]) -> None:
    root, base = web_root
    zip_dataset(FIXTURES / "ml-1m", root / "ml-1m.zip")
    (root / "ml-1m.zip.md5").write_text("MD5 (ml-1m.zip) = " + "0" * 32 + "\n")
    before = db_state(pg)
    with pytest.raises(
        IngestError,
        match=r"ml-1m.zip: checksum mismatch: MD5 [0-9a-f]{32}, "
        r"published 0{32}",
    ):
        ingest_source(f"{base}/ml-1m.zip")
    assert db_state(pg) == before


def test_url_not_found(pg: str, web_root: tuple[Path, str]) -> None:
    _, base = web_root
    with pytest.raises(IngestError, match=r"ml-9m.zip: download failed with HTTP 404"):
        ingest_source(f"{base}/ml-9m.zip")
