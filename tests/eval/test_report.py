"""`recsys report`: a self-contained HTML page that headless Chromium paints."""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from services.eval.report import write_report
from services.registry import registry
from shared.artifacts import write_artifact
from shared.db import OnlineMetric, Snapshot, session_scope

K_VALUES = (5, 10, 20)
# (algorithm, params, nDCG@10): versions 1..6 on two snapshots, as a few retrains would leave.
VERSIONS = (("popular", {}, 0.24, "s-old"), ("als", {"factors": 64}, 0.41, "s-old"),
            ("popular", {}, 0.25, "s-new"), ("als", {"factors": 128}, 0.44, "s-new"),
            ("ease", {"l2": 250.0}, 0.48, "s-new"), ("itemknn_bm25", {"k": 100}, 0.45, "s-new"))
SECTIONS = ("metric-curves", "versions", "online")


def fake_metrics(ndcg10: float) -> dict[str, float]:
    """Plausible figures at every k for a model whose nDCG@10 is `ndcg10`."""
    metrics: dict[str, float] = {}
    for k in K_VALUES:
        grow = math.log2(1 + k) / math.log2(11)
        metrics.update({
            f"ndcg@{k}": ndcg10 * (1.05 - 0.05 * grow), f"precision@{k}": ndcg10 * 0.9 / grow,
            f"recall@{k}": ndcg10 * 0.45 * grow ** 1.6, f"map@{k}": ndcg10 * 0.55 * grow,
            f"hit_rate@{k}": min(1.0, 0.5 + ndcg10 * grow), f"mrr@{k}": ndcg10 * 1.2,
            f"coverage@{k}": (0.6 - ndcg10) * grow, f"novelty@{k}": 8 + 6 * ndcg10,
            f"popularity_bias@{k}": 9 - 10 * ndcg10,
        })
    return metrics


def populate(online_windows: int = 6) -> None:
    """Versions with stored metrics, alias moves, and online windows for two variants."""
    with session_scope() as session:
        for snapshot in ("s-old", "s-new"):
            session.add(Snapshot(id=snapshot, ratings_fingerprint="f", protocol="random",
                                 params={}, counts={"users": 943, "items": 1682,
                                                    "train": 75_000, "test": 25_000},
                                 artifact_path=f"snapshots/{snapshot}", sha256="0" * 64))
    for seed, (algorithm, params, ndcg, snapshot) in enumerate(VERSIONS, start=1):
        ref = write_artifact("models", {"w": np.full(3, seed)}, {"seed": seed})
        metrics = {**fake_metrics(ndcg), "validation_ndcg@10": ndcg * 1.02}
        registry.register(snapshot, algorithm, params, ref.path, ref.sha256, metrics)
    registry.promote(2, reason="ndcg@10 0.41 >= champion (none)")
    registry.promote(4, reason="ndcg@10 0.44 >= champion v2 0.41")
    registry.promote(5, reason="ndcg@10 0.48 >= champion v4 0.44")
    registry.rollback(reason="online CTR fell below the floor")
    registry.promote(5, reason="re-promoted after the fix")
    registry.promote(6, alias="challenger", reason="ndcg@10 0.45 < champion v5 0.48")
    start = dt.datetime(2026, 11, 20, 8, tzinfo=dt.UTC)
    with session_scope() as session:
        for window in range(online_windows):
            for variant, version, base in (("champion", 5, 0.085), ("challenger", 6, 0.07)):
                lists = 400 + 30 * window
                ctr = base + 0.004 * math.sin(window) + (0.002 * window if variant == "challenger"
                                                        else 0.0)
                session.add(OnlineMetric(
                    window_start=start + dt.timedelta(hours=window),
                    window_end=start + dt.timedelta(hours=window + 1), model_version=version,
                    variant=variant, k=10, lists=lists, impressions=lists * 10,
                    clicks=int(lists * 10 * ctr), ctr=ctr, hit_rate=min(1.0, ctr * 5.5),
                    mean_click_position=3.2, feedback=lists // 3, satisfaction=0.7))


@pytest.fixture
def db(pg_url: str, use_settings, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    use_settings(DATABASE_URL=pg_url, MODEL_PATH=str(tmp_path / "models"))
    return pg_url


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page


def test_report_is_self_contained_with_three_plot_sections(db: str, tmp_path: Path) -> None:
    populate()
    summary = write_report(tmp_path / "out" / "report.html")
    page = Path(summary["output"]).read_text()
    assert (summary["versions"], summary["online_windows"], summary["champion"]) == (6, 12, 5)
    assert_self_contained(page)
    for anchor in SECTIONS:
        section = page.split(f'id="{anchor}"', 1)[1].split("</section>", 1)[0]
        assert "<svg" in section and "</svg>" in section, anchor
    assert page.count("<svg") == 3
    assert "v5 · ease" in page  # the champion's card
    assert "online CTR fell below the floor" in page  # alias history with its reason
    assert "No online data yet" not in page


def test_report_without_online_data_says_so(db: str, tmp_path: Path) -> None:
    populate(online_windows=0)
    page = Path(write_report(tmp_path / "report.html")["output"]).read_text()
    online = page.split('id="online"', 1)[1].split("</section>", 1)[0]
    assert "No online data yet" in online and "<svg" not in online
    assert page.count("<svg") == 2
    assert_self_contained(page)


def test_report_of_an_empty_registry_still_renders(db: str, tmp_path: Path) -> None:
    page = Path(write_report(tmp_path / "report.html")["output"]).read_text()
    assert "No versions registered yet" in page and "none yet" in page
    assert_self_contained(page)


def chromium() -> str:
    """Debian's chromium; installed here when missing, as .ci/run does on a fresh machine."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)),
                 None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium >/dev/null",
                       shell=True, check=False, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed: apt-get install chromium (see .ci/run)",
                    pytrace=False)
    return found


def headless(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(db: str, tmp_path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    populate()
    report = Path(write_report(tmp_path / "report.html")["output"])
    dom = headless("--dump-dom", report.as_uri(), profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in dom.stdout
    assert dom.stdout.count("<svg") == 3 and "<path" in dom.stdout
    png = tmp_path / "report.png"
    shot = headless(f"--screenshot={png}", "--window-size=1280,2000", report.as_uri(),
                    profile=tmp_path / "profile-shot")
    assert shot.returncode == 0 and png.exists(), shot.stderr
    assert png.stat().st_size > 50_000  # a blank 1280x2000 page compresses to a few KB
    with Image.open(png) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("RGB"))
    # Painted all the way down: every band of the page has drawing in it, in many colours.
    for band in np.array_split(pixels, 5, axis=0):
        assert band.reshape(-1, 3).std(axis=0).max() > 10
    colours = np.unique(pixels.reshape(-1, 3) // 8, axis=0)
    assert len(colours) > 200
    # The algorithm colours of the plots made it to the screen (ALS blue, EASE green).
    for rgb in ((0x00, 0x72, 0xB2), (0x00, 0x9E, 0x73)):
        assert (np.abs(pixels.astype(int) - rgb).sum(axis=2) < 30).sum() > 200, rgb
