"""The pipeline as a Celery chain across the service queues, built from task names only.

ingest.load -> transform.snapshot -> train.tune -> registry.register -> eval.offline ->
registry.promote_if_better. Each stage's result is the next one's first argument; with
no broker the chain runs eagerly in this process. A chain with the train stage is a
retrain and runs under the one retrain lock (shared/retrain.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from celery import chain
from celery.result import AsyncResult
from sqlalchemy import select

from shared.celery_app import app, import_tasks, queue_of, task_available
from shared.db import Snapshot, session_scope
from shared.errors import RecsysError
from shared.retrain import lock_retrain, run_retrain_here, send_retrain
from shared.settings import get_settings


@dataclass(frozen=True)
class Stage:
    name: str
    task: str
    needs: str | None  # the stage whose output this one takes


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest.load", None),
    Stage("transform", "transform.snapshot", None),
    Stage("train", "train.tune", "transform"),
    Stage("register", "registry.register", "train"),
    Stage("evaluate", "eval.offline", "register"),
    Stage("promote", "registry.promote_if_better", "evaluate"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


class PipelineError(RecsysError):
    """The requested stages cannot run as asked."""


def select_stages(stages: str | None, stage: str | None) -> list[Stage]:
    """Stages to run, in pipeline order: `all` is every stage whose task exists."""
    if stage and stages:
        raise PipelineError("give --stage or --stages, not both")
    wanted = [stage] if stage else (
        list(STAGE_NAMES) if (stages or "all") == "all" else
        [s.strip() for s in (stages or "").split(",") if s.strip()])
    unknown = [w for w in wanted if w not in STAGE_NAMES]
    if unknown:
        raise PipelineError(f"unknown stage {', '.join(unknown)}; stages are "
                            f"{', '.join(STAGE_NAMES)}")
    chosen = [s for s in STAGES if s.name in wanted and task_available(s.task)]
    names = [s.name for s in chosen]
    for position, current in enumerate(chosen):
        previous = names[position - 1] if position else None
        if current.needs and current.needs != previous and current.name != "train":
            raise PipelineError(f"stage {current.name} takes the output of {current.needs}; "
                                f"run --stages {current.needs},{current.name}")
    return chosen


def latest_snapshot(protocol: str | None) -> dict[str, Any]:
    """The newest snapshot (of `protocol` when given), for a run that starts at train."""
    with session_scope() as session:
        query = select(Snapshot).order_by(Snapshot.created_at.desc())
        if protocol:
            query = query.where(Snapshot.protocol == protocol)
        row = session.scalars(query).first()
        if row is None:
            raise PipelineError("there is no snapshot to train on; run --stages transform,train")
        return {"snapshot_id": row.id, "artifact_path": row.artifact_path,
                "sha256": row.sha256, "protocol": row.protocol, "params": row.params,
                "counts": row.counts}


def build_chain(chosen: list[Stage], options: dict[str, Any]) -> Any:
    """Signatures by task name, each routed to its service's queue."""
    kwargs = {
        "ingest": {"source": options.get("source")},
        "transform": {"protocol": options.get("protocol"),
                      "stratify": options.get("stratify")},
        "train": {"algorithms": options.get("algorithms"), "n_trials": options.get("trials"),
                  "cv_folds": options.get("cv_folds"),
                  "tune_budget": options.get("tune_budget")},
    }
    signatures = []
    for position, current in enumerate(chosen):
        args: tuple[Any, ...] = ()
        if position == 0 and current.name == "train":
            args = (latest_snapshot(options.get("protocol")),)
        signatures.append(app.signature(current.task, args=args,
                                        kwargs=kwargs.get(current.name, {}),
                                        queue=queue_of(current.task)))
    return chain(*signatures)


def results_by_stage(result: AsyncResult, chosen: list[Stage], timeout: float | None
                     ) -> dict[str, Any]:
    """Each stage's result, walking the chain's parents from the last task back."""
    found: dict[str, Any] = {}
    node: AsyncResult | None = result
    for current in reversed(chosen):
        if node is None:
            break
        found[current.name] = node.get(timeout=timeout, propagate=True)
        node = node.parent
    return found


def run_pipeline(stages: str | None = None, stage: str | None = None,
                 timeout: float | None = None, **options: Any) -> dict[str, Any]:
    """Run the chosen stages as one chain and summarise what each produced."""
    import_tasks()
    chosen = select_stages(stages, stage)
    clock = time.perf_counter()
    workflow = build_chain(chosen, options)
    if not any(s.name == "train" for s in chosen):
        result = workflow.apply() if app.conf.task_always_eager else workflow.apply_async()
    elif app.conf.task_always_eager:
        result = run_retrain_here(lock_retrain(workflow, "pipeline"))
    else:
        # A chain that trains is a retrain: it takes the one retrain lock (RetrainRunning
        # while another runs) and its last link gives it back; wait for that link too.
        result = send_retrain(lock_retrain(workflow, "pipeline"))
        result.get(timeout=timeout, propagate=True)
        result = result.parent
    outputs = results_by_stage(result, chosen, timeout)
    summary: dict[str, Any] = {"stages": [s.name for s in chosen]}
    if "ingest" in outputs:
        summary["ingest"] = outputs["ingest"]
    if "transform" in outputs:
        summary["snapshot"] = outputs["transform"]["snapshot_id"]
    if "train" in outputs:
        summary["trained"] = [{k: t.get(k) for k in ("algorithm", "params", "validation",
                                                     "cross_validation", "tuning",
                                                     "seconds")}
                              for t in outputs["train"]]
        tuned = [t["tuning"] for t in outputs["train"] if t.get("tuning")]
        summary["tuning"] = {
            "budget_seconds": options.get("tune_budget") or get_settings().tune_budget_seconds
            or None,
            "seconds": round(sum(t["seconds"] for t in tuned), 3),
            "trials_run": sum(t["trials_run"] for t in tuned),
            "trials_cut": sum(t["trials_cut"] for t in tuned),
            "cut": [{"algorithm": t["algorithm"], "trials_cut": t["tuning"]["trials_cut"],
                     "reason": t["tuning"].get("cut_reason"),
                     "skipped": bool(t.get("skipped"))}
                    for t in outputs["train"] if t.get("tuning") and t["tuning"]["trials_cut"]],
            "slack_seconds": max((t.get("slack_seconds", 0.0) for t in tuned), default=0.0),
        }
    if "evaluate" in outputs:
        summary["models"] = outputs["evaluate"]["models"]
        summary["snapshot"] = outputs["evaluate"]["snapshot"]["snapshot_id"]
    if "promote" in outputs:
        decision = outputs["promote"]
        summary.update(champion=decision["champion"], promoted=decision["promoted"],
                       reason=decision["reason"], gate=decision.get("gate"))
    summary["seconds"] = round(time.perf_counter() - clock, 3)
    return summary
