"""The command's tables piped to a file or a CI log keep their full width."""

from __future__ import annotations

import json
import subprocess
import sys

SUMMARY = {
    "stages": ["train", "register", "evaluate", "promote"], "snapshot": "s" * 64,
    "models": [{"version": v, "algorithm": a, "metrics": {
        "ndcg@10": 0.4, "precision@10": 0.3, "recall@10": 0.2, "map@10": 0.1,
        "coverage@10": 0.5}} for v, a in ((1, "itemknn_cosine"), (2, "itemknn_bm25"))],
    "champion": {"version": 2, "algorithm": "itemknn_bm25"}, "promoted": True,
    "reason": "ndcg@10 0.4000 >= champion (none) on 25000 test interactions of snapshot "
              "ssssssssssss",
    "seconds": 1.0,
}


def test_pipeline_table_is_not_cut_when_stdout_is_a_pipe() -> None:
    code = ("import json, sys; from recsys.cli import print_pipeline; "
            "print_pipeline(json.loads(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(SUMMARY)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    for word in ("precision@10", "coverage@10", "itemknn_cosine", "itemknn_bm25",
                 SUMMARY["reason"]):
        assert word in done.stdout
