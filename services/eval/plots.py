"""The evaluation report's figures, drawn with matplotlib (Agg) as inline SVG strings.

Colours are fixed per algorithm (Okabe-Ito, readable by colour-blind people) so that a
model looks the same in every figure; the champion is marked by a black ring and star,
the challenger by a dashed ring, the most-popular baseline by a grey dashed line.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to files only

import matplotlib.dates as mdates  # noqa: E402  (the backend must be chosen first)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ALGORITHM_COLOURS = {
    "als": "#0072B2", "bpr": "#CC79A7", "ease": "#009E73", "itemknn_cosine": "#E69F00",
    "itemknn_bm25": "#56B4E9", "popular": "#8C8C8C", "sparse_ease": "#44AA99",
}
EXTRA_COLOURS = ("#D55E00", "#F0E442", "#332288", "#882255", "#117733")
VARIANT_COLOURS = {"champion": "#1F3B57", "challenger": "#D55E00"}
BASELINE_COLOUR = "#8C8C8C"
INK, MUTED, GRID = "#1D2433", "#5B6474", "#E3E7EE"
CURVE_METRICS = (("ndcg", "nDCG"), ("precision", "Precision"), ("recall", "Recall"),
                 ("map", "MAP"))
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11,
    "axes.titleweight": "bold", "axes.titlecolor": INK, "axes.labelcolor": MUTED,
    "axes.edgecolor": "#B8C0CC", "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": GRID, "grid.linewidth": 0.8, "xtick.color": MUTED,
    "ytick.color": MUTED, "legend.frameon": False, "legend.fontsize": 9,
    "svg.fonttype": "path",  # glyphs as paths: the page needs no font to look the same
}


def colour_of(algorithm: str) -> str:
    if algorithm in ALGORITHM_COLOURS:
        return ALGORITHM_COLOURS[algorithm]
    return EXTRA_COLOURS[sum(map(ord, algorithm)) % len(EXTRA_COLOURS)]


def variant_rank(variant: str) -> tuple[int, str]:
    """Champion first, challenger second, any other variant after them by name."""
    return ({"champion": 0, "challenger": 1}.get(variant, 2), variant)


def variant_colour(variant: str, position: int) -> str:
    return VARIANT_COLOURS.get(variant, EXTRA_COLOURS[position % len(EXTRA_COLOURS)])


@contextmanager
def figure(width: float, height: float, **subplots: Any) -> Iterator[tuple[Figure, Any]]:
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(figsize=(width, height), **subplots)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def to_svg(fig: Figure, salt: str) -> str:
    """The figure as an `<svg>` element fit for inlining: no prolog, metadata or URLs."""
    buffer = io.StringIO()
    with plt.rc_context({"svg.hashsalt": salt}):  # distinct clip-path ids per figure
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    head, body = svg.split(">", 1)
    head = re.sub(r'\s(?:xmlns(?::xlink)?|width|height|version)="[^"]*"', "", head)
    svg = f"{head}>{body}"
    return svg.replace("<svg", f'<svg role="img" aria-label="{salt}"', 1)


def _mark_roles(ax: Any, x: Sequence[float], y: Sequence[float], roles: Sequence[list[str]]
                ) -> None:
    for xi, yi, aliases in zip(x, y, roles, strict=True):
        if "champion" in aliases:
            ax.scatter([xi], [yi], s=260, facecolors="none", edgecolors=INK, linewidths=2,
                       zorder=4)
        if "challenger" in aliases:
            ax.scatter([xi], [yi], s=260, facecolors="none", edgecolors=INK, linewidths=1.4,
                       linestyles="--", zorder=4)


def metric_curves(models: list[dict[str, Any]], baseline: dict[str, float] | None,
                  k_values: list[int]) -> str:
    """nDCG, precision, recall and MAP against k: one line per version, baseline dashed."""
    with figure(11.5, 3.6, ncols=4, sharex=True) as (fig, axes):
        for ax, (metric, title) in zip(axes, CURVE_METRICS, strict=True):
            for model in models:
                ks = [k for k in k_values if f"{metric}@{k}" in model["metrics"]]
                ys = [model["metrics"][f"{metric}@{k}"] for k in ks]
                champion = "champion" in model["aliases"]
                ax.plot(ks, ys, marker="o", markersize=6 if champion else 4,
                        linewidth=2.8 if champion else 1.6, color=colour_of(model["algorithm"]),
                        label=model["label"], zorder=3 if champion else 2)
            if baseline:
                ks = [k for k in k_values if f"{metric}@{k}" in baseline]
                ax.plot(ks, [baseline[f"{metric}@{k}"] for k in ks], linestyle="--",
                        marker="s", markersize=4, linewidth=1.6, color=BASELINE_COLOUR,
                        label="most-popular baseline", zorder=1)
            ax.set_title(f"{title}@k")
            ax.set_xlabel("k (list length, log scale)")
            ax.set_xscale("log")  # k values usually double: evenly spaced on a log axis
            ax.set_xticks(k_values, [str(k) for k in k_values])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
        axes[0].set_ylabel("score on the test split")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 5),
                   bbox_to_anchor=(0.5, -0.1))
        fig.tight_layout()
        return to_svg(fig, "metric-at-k-curves")


def versions_figure(versions: list[dict[str, Any]], alias_changes: list[dict[str, Any]],
                    metric: str) -> str:
    """Top: `metric` by version number with the baseline; bottom: the aliases' history."""
    with figure(11.5, 6.2, nrows=2, gridspec_kw={"height_ratios": [3, 2]}) as (fig, (top, low)):
        scored = [v for v in versions if metric in v["metrics"]]
        xs = [v["version"] for v in scored]
        for algorithm in dict.fromkeys(v["algorithm"] for v in scored):
            mine = [v for v in scored if v["algorithm"] == algorithm]
            top.scatter([v["version"] for v in mine], [v["metrics"][metric] for v in mine],
                        s=70, color=colour_of(algorithm), label=algorithm, zorder=3,
                        edgecolors="white", linewidths=0.8)
        _mark_roles(top, xs, [v["metrics"][metric] for v in scored],
                    [v["aliases"] for v in scored])
        for v in scored:
            for alias in v["aliases"]:
                top.annotate(("★ " if alias == "champion" else "") + alias,
                             (v["version"], v["metrics"][metric]), xytext=(0, 14),
                             textcoords="offset points", ha="center", fontsize=9,
                             fontweight="bold" if alias == "champion" else "normal", color=INK)
        with_baseline = [v for v in scored if v.get("baseline") and metric in v["baseline"]]
        if with_baseline:
            top.step([v["version"] for v in with_baseline],
                     [v["baseline"][metric] for v in with_baseline], where="mid",
                     linestyle="--", color=BASELINE_COLOUR, linewidth=1.6,
                     label="most-popular baseline (same snapshot)")
        top.set_title(f"{metric} on each version's test split")
        top.set_xlabel("model version")
        top.set_ylabel(metric)
        top.set_xticks(xs or [0])
        top.set_ylim(0, max([v["metrics"][metric] for v in scored] or [1]) * 1.25)
        top.legend(loc="upper left", ncols=min(len(top.get_legend_handles_labels()[1]), 6))
        _alias_timeline(low, alias_changes)
        fig.tight_layout()
        return to_svg(fig, "versions-and-aliases")


def _alias_timeline(ax: Any, changes: list[dict[str, Any]]) -> None:
    ax.set_title("alias history (each promotion or rollback, in order)")
    if not changes:
        ax.text(0.5, 0.5, "no alias has been moved yet", ha="center", va="center",
                transform=ax.transAxes, color=MUTED)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    order = list(range(1, len(changes) + 1))
    for alias, style in (("champion", "-"), ("challenger", "--")):
        steps = [(i, c["to_version"]) for i, c in zip(order, changes, strict=True)
                 if c["alias"] == alias]
        if not steps:
            continue
        xs, ys = [s[0] for s in steps], [s[1] if s[1] is not None else 0 for s in steps]
        ax.step(xs + [order[-1] + 0.5], ys + ys[-1:], where="post", linestyle=style,
                linewidth=2.4 if alias == "champion" else 1.6, color=INK, label=alias)
        for (x, y), change in zip(steps, [c for c in changes if c["alias"] == alias],
                                  strict=True):
            rollback = change["action"] == "rollback"
            ax.scatter([x], [y], s=70 if alias == "champion" else 45, zorder=3,
                       marker="v" if rollback else "o",
                       color="#D55E00" if rollback else colour_of(change.get("algorithm", "")),
                       edgecolors="white", linewidths=0.8)
            ax.annotate(f"v{y}" + (" (rollback)" if rollback else ""), (x, y), xytext=(6, 6),
                        textcoords="offset points", fontsize=8, color=MUTED)
    ax.set_xticks(order, [_short_time(c["created_at"]) for c in changes],
                  rotation=30 if len(changes) > 6 else 0, ha="right" if len(changes) > 6
                  else "center", fontsize=8)
    ax.set_xlim(0.5, order[-1] + 0.5)
    ax.set_ylabel("version")
    held = sorted({c["to_version"] for c in changes if c["to_version"] is not None})
    ax.set_yticks(held if len(held) <= 12 else held[:: len(held) // 12 + 1])
    ax.set_ylim((held[0] if held else 0) - 0.6, (held[-1] if held else 1) + 0.6)
    ax.legend(loc="upper left", ncols=2)


def _short_time(value: dt.datetime | None) -> str:
    return value.strftime("%m-%d %H:%M") if value else "?"


def online_figure(rows: list[dict[str, Any]],
                  promotions: list[dict[str, Any]] | None = None) -> str:
    """CTR@k and hit rate per variant over each window's end; each champion move in
    `promotions` (alias changes) a dotted vertical line."""
    with figure(11.5, 3.8, ncols=2, sharex=True) as (fig, (ctr, hits)):
        variants = sorted({r["variant"] for r in rows}, key=variant_rank)
        for position, variant in enumerate(variants):
            mine = sorted((r for r in rows if r["variant"] == variant),
                          key=lambda r: r["window_end"])
            ends = [r["window_end"] for r in mine]
            colour = variant_colour(variant, position)
            ks = sorted({r["k"] for r in mine})
            label = f"{variant} (k={','.join(map(str, ks))})"
            ctr.plot(ends, [r["ctr"] for r in mine], marker="o", markersize=4, linewidth=2,
                     color=colour, label=label)
            hits.plot(ends, [r["hit_rate"] for r in mine], marker="o", markersize=4,
                      linewidth=2, color=colour, label=label)
        ctr.set_title("click-through rate @k per window")
        ctr.set_ylabel("CTR (clicks / impressions)")
        hits.set_title("hit rate per window (lists with a click)")
        hits.set_ylabel("hit rate")
        for ax in (ctr, hits):
            for move in promotions or []:
                ax.axvline(move["created_at"], linestyle=":", linewidth=1.4,
                           color="#D55E00" if move["action"] == "rollback" else INK)
                ax.annotate(f"v{move['to_version']}", (move["created_at"], 1), xytext=(3, -10),
                            xycoords=("data", "axes fraction"), textcoords="offset points",
                            fontsize=8, color=MUTED)
            ax.set_xlabel("window end (UTC)")
            ax.set_ylim(bottom=0)
            ax.legend(loc="lower left")
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
            for label in ax.get_xticklabels():
                label.set_rotation(25)
                label.set_horizontalalignment("right")
        fig.tight_layout()
        return to_svg(fig, "online-metrics")
