"""The evaluation report: one self-contained HTML page (inline CSS and SVG, no URLs).

It reads only what the registry and eval services stored (`model_version`, `model_alias`,
`alias_change`, `snapshot`, `online_metric`), so it is quick and needs no artifacts: run
`recsys eval` first to give a version its baseline figures.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select

from services.eval import plots
from services.eval.offline import DEFAULT_NAME
from services.eval.versions import BASELINE_ALGORITHM, BASELINE_PREFIX
from shared.db import AliasChange, ModelAlias, ModelVersion, OnlineMetric, Snapshot, session_scope
from shared.metrics import METRIC_NAMES

TEST_METRIC = re.compile(rf"^({'|'.join(METRIC_NAMES)})@(\d+)$")
HEADLINE = "ndcg"
TABLE_METRICS = (("ndcg", "nDCG"), ("precision", "P"), ("recall", "R"), ("map", "MAP"),
                 ("hit_rate", "HR"), ("mrr", "MRR"), ("coverage", "Cov"),
                 ("novelty", "Novelty"), ("popularity_bias", "Pop. bias"))


def _test_metrics(stored: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {key[len(prefix):]: float(value) for key, value in stored.items()
            if key.startswith(prefix) and TEST_METRIC.match(key[len(prefix):])}


def gather(name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Everything the report shows, read from the tables."""
    with session_scope() as session:
        aliases: dict[int, list[str]] = {}
        for row in session.scalars(select(ModelAlias).where(ModelAlias.name == name)):
            aliases.setdefault(row.version, []).append(row.alias)
        versions = [{
            "version": v.version, "algorithm": v.algorithm, "params": v.params,
            "snapshot": v.snapshot_id, "created_at": v.created_at,
            "aliases": sorted(aliases.get(v.version, [])),
            "metrics": _test_metrics(v.metrics or {}),
            "baseline": _test_metrics(v.metrics or {}, BASELINE_PREFIX),
            "label": f"v{v.version} {v.algorithm}"
                     + (" ★" if "champion" in aliases.get(v.version, []) else ""),
        } for v in session.scalars(select(ModelVersion).where(ModelVersion.name == name)
                                   .order_by(ModelVersion.version))]
        used = {v["snapshot"] for v in versions}
        snapshots = {s.id: {"id": s.id, "protocol": s.protocol, "counts": s.counts,
                            "params": s.params, "created_at": s.created_at}
                     for s in session.scalars(select(Snapshot).where(Snapshot.id.in_(used)))}
        algorithm_of = {v["version"]: v["algorithm"] for v in versions}
        changes = [{"alias": c.alias, "from_version": c.from_version,
                    "to_version": c.to_version, "action": c.action, "reason": c.reason,
                    "created_at": c.created_at,
                    "algorithm": algorithm_of.get(c.to_version or -1, "")}
                   for c in session.scalars(select(AliasChange).where(AliasChange.name == name)
                                            .order_by(AliasChange.id))]
        online = [{"window_start": o.window_start, "window_end": o.window_end,
                   "model_version": o.model_version, "variant": o.variant, "k": o.k,
                   "lists": o.lists, "impressions": o.impressions, "clicks": o.clicks,
                   "ctr": o.ctr, "hit_rate": o.hit_rate}
                  for o in session.scalars(select(OnlineMetric).order_by(
                      OnlineMetric.window_end, OnlineMetric.variant))]
    _fill_baselines(versions)
    return {"name": name, "versions": versions, "snapshots": snapshots,
            "alias_changes": changes, "online": online,
            "champion": next((v for v in versions if "champion" in v["aliases"]), None),
            "generated_at": dt.datetime.now(dt.UTC)}


def _fill_baselines(versions: list[dict[str, Any]]) -> None:
    """A version without stored baseline figures borrows its snapshot's: the registered
    `popular` version's, else those `recsys eval` stored on a sibling."""
    by_snapshot: dict[str, dict[str, float]] = {}
    for v in versions:
        if v["algorithm"] == BASELINE_ALGORITHM and v["metrics"]:
            by_snapshot.setdefault(v["snapshot"], v["metrics"])
    for v in versions:
        if v["baseline"]:
            by_snapshot.setdefault(v["snapshot"], v["baseline"])
    for v in versions:
        v["baseline"] = v["baseline"] or by_snapshot.get(v["snapshot"], {})


def focus_snapshot(data: dict[str, Any]) -> str | None:
    """The newest snapshot that has versions (ties: the one with the newest version), so
    the curves compare models on one test split."""
    if not data["versions"]:
        return None
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    newest = {v["snapshot"]: v["version"] for v in data["versions"]}  # versions ascend
    return max(newest, key=lambda s: (_aware(data["snapshots"].get(s, {}).get("created_at"))
                                      or epoch, newest[s]))


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    return value.replace(tzinfo=dt.UTC) if value and value.tzinfo is None else value


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _headline_k(versions: list[dict[str, Any]]) -> int:
    ks = sorted({int(m.group(2)) for v in versions for key in v["metrics"]
                 if (m := TEST_METRIC.match(key))})
    return 10 if 10 in ks or not ks else ks[-1]


def _cards(data: dict[str, Any], k: int) -> str:
    champion, cards = data["champion"], []
    if champion is None:
        cards.append(_card("Champion", "none yet",
                           "run <code>recsys pipeline</code> or promote a version"))
    else:
        m, base = champion["metrics"], champion["baseline"]
        params = _params(champion["params"])
        shown = params if len(params) <= 60 else params[:57].rsplit(",", 1)[0] + ", …"
        cards.append(_card("Champion", f"v{champion['version']} · {_esc(champion['algorithm'])}",
                           f'<span title="{_esc(params)}">{_esc(shown)}</span>'))
        score, floor = m.get(f"{HEADLINE}@{k}"), base.get(f"{HEADLINE}@{k}")
        lift = (f"{score - floor:+.4f} over most-popular ({floor:.4f})"
                if score is not None and floor is not None else "no baseline stored yet")
        cards.append(_card(f"nDCG@{k}", _fmt(score), lift, accent=True))
        cards.append(_card(f"Precision@{k}", _fmt(m.get(f"precision@{k}")),
                           f"recall {_fmt(m.get(f'recall@{k}'), 3)}, MAP "
                           f"{_fmt(m.get(f'map@{k}'), 3)}, hit rate "
                           f"{_fmt(m.get(f'hit_rate@{k}'), 3)}"))
        cards.append(_card(f"Coverage@{k}", _fmt(m.get(f"coverage@{k}"), 3),
                           f"novelty {_fmt(m.get(f'novelty@{k}'), 2)} bits, popularity bias "
                           f"{_fmt(m.get(f'popularity_bias@{k}'), 2)}×"))
        snap = data["snapshots"].get(champion["snapshot"], {})
        counts = snap.get("counts") or {}
        cards.append(_card("Protocol", _esc(snap.get("protocol", "?")),
                           f"snapshot <code>{_esc(champion['snapshot'][:10])}</code>: "
                           f"{counts.get('users', '?')} users, {counts.get('items', '?')} items, "
                           f"{counts.get('train', '?')} train / {counts.get('test', '?')} test"))
    cards.append(_card("Registry", f"{len(data['versions'])} versions",
                       f"{len({v['snapshot'] for v in data['versions']})} snapshots, "
                       f"{len(data['alias_changes'])} alias moves, "
                       f"{len(data['online'])} online windows"))
    return f'<section class="cards">{"".join(cards)}</section>'


def _card(title: str, value: str, note: str, accent: bool = False) -> str:
    return (f'<div class="card{" accent" if accent else ""}"><div class="card-title">{title}'
            f'</div><div class="card-value">{value}</div><div class="card-note">{note}</div>'
            "</div>")


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in sorted(params.items())) or "default parameters"


def _section(anchor: str, title: str, caption: str, body: str) -> str:
    return (f'<section class="panel" id="{anchor}"><h2>{title}</h2>'
            f'<p class="caption">{caption}</p>{body}</section>')


def _empty(message: str) -> str:
    return f'<div class="empty"><div class="empty-icon">∅</div>{message}</div>'


def _curves_section(data: dict[str, Any]) -> str:
    snapshot = focus_snapshot(data)
    models = [v for v in data["versions"] if v["snapshot"] == snapshot and v["metrics"]]
    lines = [v for v in models if v["algorithm"] != BASELINE_ALGORITHM] or models
    baseline = next((v["baseline"] for v in models if v["baseline"]), None)
    ks = sorted({int(m.group(2)) for v in lines for key in v["metrics"]
                 if (m := TEST_METRIC.match(key))})
    caption = ("Each version of the newest snapshot"
               + (f" (<code>{_esc(snapshot[:12])}</code>)" if snapshot else "")
               + " against the most-popular baseline on the same test split. Higher is better;"
               " the champion is drawn thicker.")
    body = (plots.metric_curves(lines, baseline, ks) if lines and ks else
            _empty("No version has test-split metrics yet: run <code>recsys pipeline</code> "
                   "or <code>recsys eval --model VERSION</code>."))
    return _section("metric-curves", "Accuracy at every k", caption, body)


def _versions_section(data: dict[str, Any], k: int) -> str:
    metric = f"{HEADLINE}@{k}"
    if not any(metric in v["metrics"] for v in data["versions"]):
        body = _empty(f"No version has {metric} yet.")
    else:
        rows = "".join(
            f"<tr><td>{_esc(_short(c['created_at']))}</td><td>{_esc(c['alias'])}</td>"
            f"<td>{_version(c['from_version'])} → {_version(c['to_version'])}</td>"
            f"<td><span class=\"tag {_esc(c['action'])}\">{_esc(c['action'])}</span></td>"
            f"<td class=\"reason\">{_esc(c['reason'])}</td></tr>"
            for c in reversed(data["alias_changes"][-8:]))
        history = ("<table class=\"compact\"><thead><tr><th>when (UTC)</th><th>alias</th>"
                   "<th>move</th><th>action</th><th>reason</th></tr></thead>"
                   f"<tbody>{rows}</tbody></table>" if rows else "")
        body = plots.versions_figure(data["versions"], data["alias_changes"], metric) + history
    caption = (f"{metric} of every registered version on its own snapshot's test split, coloured "
               "by algorithm; ringed points hold an alias. Below, every promotion and rollback "
               "from <code>alias_change</code>, newest first in the table.")
    return _section("versions", "Champion, challengers and the baseline over versions",
                    caption, body)


def _online_section(data: dict[str, Any]) -> str:
    if not data["online"]:
        body = _empty("<strong>No online data yet.</strong> Online figures appear once serve "
                      "has logged impressions and feedback and <code>eval.online</code> has "
                      "aggregated a window into <code>online_metric</code>.")
    else:
        body = plots.online_figure(data["online"]) + _latest_windows(data["online"])
    caption = "Click-through rate and hit rate of the served lists, per A/B variant and window."
    return _section("online", "Online metrics over time", caption, body)


def _latest_windows(rows: list[dict[str, Any]]) -> str:
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:  # ordered by window end
        latest[row["variant"]] = row
    cells = "".join(
        f"<tr><td>{_esc(variant)}</td><td>{_version(r['model_version'])}</td>"
        f"<td>{_esc(_short(r['window_end']))}</td><td class=\"num\">{r['lists']}</td>"
        f"<td class=\"num\">{r['impressions']}</td><td class=\"num\">{r['clicks']}</td>"
        f"<td class=\"num\">{_fmt(r['ctr'])}</td><td class=\"num\">{_fmt(r['hit_rate'])}</td>"
        "</tr>" for variant, r in sorted(latest.items(), key=lambda i: plots.variant_rank(i[0])))
    return ("<table class=\"compact\"><thead><tr><th>variant</th><th>version</th>"
            "<th>latest window end (UTC)</th><th>lists</th><th>impressions</th><th>clicks</th>"
            f"<th>CTR@k</th><th>hit rate</th></tr></thead><tbody>{cells}</tbody></table>")


def _version(number: int | None) -> str:
    return "–" if number is None else f"v{number}"


def _short(value: dt.datetime | None, pattern: str = "%Y-%m-%d %H:%M") -> str:
    return value.strftime(pattern) if value else "?"


def _cell(v: dict[str, Any], metric: str, k: int, best: float | None) -> str:
    value = v["metrics"].get(f"{metric}@{k}")
    bold = " best" if value is not None and value == best else ""
    return f'<td class="num{bold}">{_fmt(value, 2 if metric == "novelty" else 3)}</td>'


def _table_section(data: dict[str, Any], k: int) -> str:
    head = "".join(f"<th class=\"num\">{label}</th>" for _, label in TABLE_METRICS)
    accuracy = {metric for metric, _ in TABLE_METRICS[:6]}
    best = {metric: max((v["metrics"].get(f"{metric}@{k}", float("-inf"))
                         for v in data["versions"]), default=None) for metric in accuracy}
    rows = []
    for v in reversed(data["versions"]):
        cells = "".join(_cell(v, metric, k, best.get(metric)) for metric, _ in TABLE_METRICS)
        badges = "".join(f'<span class="tag {a}">{a}</span>' for a in v["aliases"])
        colour = plots.colour_of(v["algorithm"])
        rows.append(f'<tr><td>v{v["version"]}</td><td><span class="swatch" style="background:'
                    f'{colour}"></span>{_esc(v["algorithm"])} {badges}</td>'
                    f'<td><code>{_esc(v["snapshot"][:10])}</code></td>{cells}'
                    f'<td class="num">{_fmt(v["baseline"].get(f"{HEADLINE}@{k}"), 3)}</td>'
                    f'<td>{_esc(_short(v["created_at"], "%m-%d %H:%M"))}</td></tr>')
    body = (f"<div class=\"scroll\"><table class=\"compact\"><thead><tr><th>version</th>"
            f"<th>algorithm</th><th>snapshot</th>{head}<th class=\"num\">popular nDCG</th>"
            f"<th>registered</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            if rows else _empty("No versions registered yet."))
    return _section("versions-table", f"Every version, at k={k}", "Test-split figures at "
                    f"k={k} (P precision, R recall, HR hit rate, Cov catalogue coverage, novelty "
                    "in bits); the best accuracy in each column is bold.", body)


def render_report(data: dict[str, Any]) -> str:
    """The whole page as one HTML string."""
    k = _headline_k(data["versions"])
    sections = [_cards(data, k), _curves_section(data), _versions_section(data, k),
                _online_section(data), _table_section(data, k)]
    stamp = data["generated_at"].strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>recsys evaluation · {_esc(data['name'])}</title><style>{CSS}</style></head>"
            f"<body><main><header><div><h1>Recommender evaluation</h1><p class=\"sub\">model "
            f"<strong>{_esc(data['name'])}</strong> · generated {stamp}</p></div>"
            f"<nav><a href=\"#metric-curves\">metric@k</a><a href=\"#versions\">versions</a>"
            f"<a href=\"#online\">online</a><a href=\"#versions-table\">table</a></nav></header>"
            f"{''.join(sections)}<footer>Written by <code>recsys report</code> from the registry "
            "and eval tables. Offline figures are measured on each version's snapshot test "
            "split (train items removed); the baseline recommends the most-rated train items."
            "</footer></main></body></html>")


def write_report(output: str | Path, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Render the report from the database into `output`; a small summary of what it shows."""
    data = gather(name)
    page = render_report(data)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    champion = data["champion"]
    return {"output": str(path.resolve()), "bytes": len(page.encode()),
            "versions": len(data["versions"]), "online_windows": len(data["online"]),
            "champion": champion["version"] if champion else None}


CSS = """
*{box-sizing:border-box}body{margin:0;background:#F3F5F9;color:#1D2433;
font:15px/1.5 "DejaVu Sans","Liberation Sans",system-ui,sans-serif}
main{max-width:1240px;margin:0 auto;padding:28px 24px 40px}
header{display:flex;justify-content:space-between;align-items:flex-end;gap:16px;
margin-bottom:20px;padding-bottom:14px;border-bottom:3px solid #1F3B57}
h1{margin:0;font-size:28px;letter-spacing:-.5px}h2{margin:0 0 4px;font-size:19px}
.sub{margin:4px 0 0;color:#5B6474}nav a{margin-left:14px;color:#0072B2;text-decoration:none;
font-weight:600}code{font:13px "DejaVu Sans Mono",monospace;background:#EEF1F6;padding:1px 5px;
border-radius:4px}.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));
gap:14px;margin-bottom:20px}.card{background:#fff;border-radius:12px;padding:14px 16px;
box-shadow:0 1px 3px rgba(20,30,50,.08);border-top:4px solid #B8C0CC}
.card.accent{border-top-color:#009E73}.card-title{font-size:12px;text-transform:uppercase;
letter-spacing:.6px;color:#5B6474;font-weight:600}.card-value{font-size:24px;font-weight:700;
margin:4px 0 2px}.card-note{font-size:13px;color:#5B6474}
.panel{background:#fff;border-radius:14px;padding:20px 22px;margin-bottom:20px;
box-shadow:0 1px 3px rgba(20,30,50,.08)}.caption{margin:0 0 10px;color:#5B6474;font-size:14px}
.panel svg{display:block;width:100%;height:auto}
.empty{border:2px dashed #C9D0DB;border-radius:12px;padding:36px;text-align:center;
color:#5B6474;font-size:16px;background:#FAFBFD}.empty-icon{font-size:34px;color:#B8C0CC}
.scroll{overflow-x:auto}table.compact{border-collapse:collapse;width:100%;font-size:13px;
margin-top:12px}.compact th{text-align:left;color:#5B6474;font-weight:600;
border-bottom:2px solid #E3E7EE;padding:6px 8px;white-space:nowrap}
.compact td{border-bottom:1px solid #EEF1F6;padding:6px 8px;white-space:nowrap}
.compact th.num{text-align:right}
.compact tbody tr:nth-child(even){background:#FAFBFD}.num{text-align:right;
font-variant-numeric:tabular-nums}.best{font-weight:700}.reason{white-space:normal!important;
color:#5B6474}.tag{display:inline-block;font-size:11px;font-weight:700;padding:1px 7px;
border-radius:9px;margin-left:4px;background:#EEF1F6;color:#1F3B57}
.tag.champion{background:#1F3B57;color:#fff}.tag.challenger{background:#FBE3D5;color:#A4410A}
.tag.rollback{background:#FBE3D5;color:#A4410A}.swatch{display:inline-block;width:10px;
height:10px;border-radius:50%;margin-right:6px}
footer{color:#5B6474;font-size:13px;margin-top:8px}
"""
