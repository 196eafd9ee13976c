"""The release timeline: cut → checks → fine-tune → gate verdict → canary shares → A/B decision →
production, told the same way on every surface (the `model_evaluation` and `ab_test` pages, `qe
status`, the dashboards).

`read_rows` is the only part that reads the store (a handful of small queries);
`release_timeline` is a pure function of those rows; `markdown`, `text_lines` and `table` render
its steps. Which release: the one whose candidate has traffic now, else the newest cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from qe_assets.rollout.sequential import PROMOTE, ROLLBACK

DONE, RUNNING, WAITING, FAILED, SKIPPED = "done", "running", "waiting", "failed", "skipped"
_MARK = {DONE: "✓", RUNNING: "…", WAITING: "·", FAILED: "✗", SKIPPED: "–"}
ENDING = (PROMOTE, ROLLBACK)


@dataclass(frozen=True)
class Step:
    stage: str  # cut | checks | fine-tune | gate | canary | A/B test | production
    status: str  # done | running | waiting | failed | skipped
    text: str
    at: datetime | None = None


@dataclass(frozen=True)
class Rows:
    """What the timeline is built from: plain dicts, as the tables hold them."""

    version: dict[str, Any] | None = None  # dataset_versions
    runs: list[dict[str, Any]] = field(default_factory=list)  # fine_tune_runs of the version
    evaluation: dict[str, Any] | None = None  # the model's gate evaluation (comparison production)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # ab_decisions of its test
    promotion: dict[str, Any] | None = None  # promoted_models row naming the model, newest
    production: str | None = None  # production now (promoted_models, else the tested baseline)


def _dicts(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _one(conn: duckdb.DuckDBPyConnection, query: str, params: list[Any]) -> dict[str, Any] | None:
    rows = _dicts(conn.execute(query, params))
    return rows[0] if rows else None


def read_rows(conn: duckdb.DuckDBPyConnection) -> Rows:
    """The rows of the release in flight: the version whose model has candidate traffic (or
    whose test ended last, if no newer version was cut), else the newest version. A store from
    before a table existed gives what it has."""
    try:
        newest = _one(conn, "SELECT * FROM dataset_versions ORDER BY number DESC LIMIT 1", [])
        last_test = _one(conn, "SELECT * FROM ab_decisions ORDER BY decision_id DESC LIMIT 1", [])
    except duckdb.CatalogException:
        return Rows()
    version = newest
    if last_test is not None:
        tested = _one(
            conn,
            "SELECT v.* FROM fine_tune_runs r JOIN dataset_versions v ON v.version = "
            "r.dataset_version WHERE r.model_id = ? ORDER BY r.updated_at DESC LIMIT 1",
            [last_test["candidate"]],
        )
        ended = last_test["decision"] in ENDING or last_test["share"] <= 0
        # A running test is the release in flight even when a newer version was cut meanwhile.
        if tested is not None and (
            not ended or newest is None or tested["number"] >= newest["number"]
        ):
            version = tested
    if version is None:
        return Rows()
    runs = _dicts(
        conn.execute(
            "SELECT * FROM fine_tune_runs WHERE dataset_version = ? ORDER BY created_at, run_id",
            [version["version"]],
        )
    )
    model = next((r["model_id"] for r in reversed(runs) if r["model_id"]), None)
    evaluation = decisions = promotion = None
    if model is not None:
        evaluation = _one(
            conn,
            "SELECT * FROM model_evaluations WHERE candidate = ? AND comparison = 'production' "
            "ORDER BY created_at DESC LIMIT 1",
            [model],
        )
        decisions = _dicts(
            conn.execute(
                """
                WITH newest AS (SELECT test_started_at FROM ab_decisions WHERE candidate = ?
                                ORDER BY decision_id DESC LIMIT 1)
                SELECT a.* FROM ab_decisions a JOIN newest USING (test_started_at)
                WHERE a.candidate = ? ORDER BY a.decision_id
                """,
                [model, model],
            )
        )
        promotion = _one(
            conn,
            "SELECT * FROM promoted_models WHERE model = ? AND action = 'promote' "
            "ORDER BY promotion_id DESC LIMIT 1",
            [model],
        )
    current = _one(conn, "SELECT model FROM promoted_models ORDER BY promotion_id DESC LIMIT 1", [])
    production = current["model"] if current else (last_test or {}).get("production")
    return Rows(version, runs, evaluation, decisions or [], promotion, production)


def _share_steps(decisions: list[dict[str, Any]]) -> list[Step]:
    """One step per share the candidate was given (the gate's start, the ramp, a person)."""
    steps, share = [], 0.0
    for row in decisions:
        if row["decision"] in ENDING or row["share"] == share:
            continue
        if row["share"] <= 0:
            what = f"share 0: traffic stopped by {row['decided_by']} ({row['reason']})"
            steps.append(Step("canary", FAILED, what, row["decided_at"]))
        else:
            what = f"{share:.0%} → {row['share']:.0%} of traffic, by {row['decided_by']}"
            if row["decided_by"] != "ab_test":
                what += f" ({row['reason']})"
            steps.append(Step("canary", DONE, what, row["decided_at"]))
        share = row["share"]
    return steps


def _requests(row: dict[str, Any]) -> int:
    return int(row["answers_production"]) + int(row["answers_candidate"])


def release_timeline(rows: Rows, progress: str | None = None) -> list[Step]:
    """The release's steps, oldest first; steps not reached yet say what they wait for.
    `progress`: how far the running test is from a decision (`Distance.text()`)."""
    if rows.version is None:
        return [Step("cut", WAITING, "no dataset version yet: waiting for QE_FINETUNE_THRESHOLD")]
    v = rows.version
    steps = [Step("cut", DONE, f"{v['version']}: {v['sample_count']:,} samples", v["created_at"])]
    rejected = next((r for r in rows.runs if r["status"] == "rejected"), None)
    run = next((r for r in reversed(rows.runs) if r["status"] != "rejected"), None)
    if rejected is not None:
        steps.append(
            Step("checks", FAILED, rejected["message"] or "rejected", rejected["created_at"])
        )
        return steps
    if run is None:
        steps.append(Step("checks", WAITING, "blocking dataset checks, then the fine-tune"))
        return steps
    steps.append(Step("checks", DONE, "blocking dataset checks passed", run["created_at"]))
    status, model = run["status"], run["model_id"]
    if status == "running":
        steps.append(Step("fine-tune", RUNNING, f"{run['backend']} job {run['job_id'] or ''}"))
        return steps
    if model is None:
        state = SKIPPED if status == "skipped" else FAILED
        steps.append(
            Step("fine-tune", state, f"{status}: {run['message'] or ''}", run["updated_at"])
        )
        return steps
    steps.append(Step("fine-tune", DONE, f"{model} ({run['backend']})", run["updated_at"]))
    e = rows.evaluation
    if e is None:
        steps.append(Step("gate", WAITING, "evaluation on the held-out prompts"))
        return steps
    verdict = (
        f"win rate {e['win_rate']:.3f}, 95 % lower bound {e['ci_low']:.3f}, "
        f"{e['n']:,} judged pairs against {e['baseline']}"
    )
    if e["decision"] != PROMOTE:
        state = WAITING if e["decision"] == "insufficient_data" else FAILED
        what = f"{e['decision']}: {verdict} ({e['reason']})"
        steps.append(Step("gate", state, what, e["created_at"]))
        return steps
    steps.append(Step("gate", DONE, f"passed: {verdict}", e["created_at"]))
    steps.extend(_share_steps(rows.decisions))
    last = rows.decisions[-1] if rows.decisions else None
    if last is not None and last["decision"] in ENDING:
        statistic = f"Λ {last['statistic']:.1f}" if last["statistic"] is not None else ""
        what = f"{last['decision']} at {statistic} after {_requests(last):,} requests".replace(
            "at  after", "after"
        )
        state = DONE if last["decision"] == PROMOTE else FAILED
        who = last["decided_by"]
        who += "" if who == "ab_test" else f": {last['reason']}"  # a person says why
        steps.append(Step("A/B test", state, f"{what} ({who})", last["decided_at"]))
    elif last is not None and last["share"] > 0:
        what = f"running: {_requests(last):,} requests so far"
        steps.append(Step("A/B test", RUNNING, f"{what}; {progress}" if progress else what))
    p = rows.promotion
    if p is not None:
        what = f"{p['model']} is production (promoted by {p['promoted_by']})"
        if rows.production != p["model"]:
            what += f"; since replaced by {rows.production}"
        steps.append(Step("production", DONE, what, p["promoted_at"]))
    elif last is None:
        steps.append(Step("production", WAITING, "passed the gate; no traffic given yet"))
    else:
        stays = rows.production or last["production"]
        running = last["share"] > 0 and last["decision"] not in ENDING
        what = f"{stays} stays production" + (" until the A/B test decides" if running else "")
        steps.append(Step("production", WAITING if running else SKIPPED, what))
    return steps


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}" if at is not None else ""


def markdown(steps: list[Step]) -> str:
    """A table for the asset pages (times short: the page's column is narrow)."""
    lines = ["| | step | when (UTC) | what happened |", "|---|---|---|---|"]
    for s in steps:
        text = s.text.replace("|", "\\|").replace("\n", " ")
        when = f"{s.at:%m-%d %H:%M}" if s.at is not None else ""
        lines.append(f"| {_MARK[s.status]} | {s.stage} | {when} | {text} |")
    return "\n".join(lines)


def text_lines(steps: list[Step]) -> list[str]:
    """One line per step, for `qe status`."""
    return [
        f"  {_MARK[s.status]} {s.stage:<10} {_when(s.at) or '(' + s.status + ')':<19}  {s.text}"
        for s in steps
    ]


def table(steps: list[Step]) -> dict[str, Any]:
    """Columns and rows for the dashboards' timeline panel."""
    return {
        "columns": ["", "step", "when (UTC)", "what happened"],
        "rows": [[_MARK[s.status], s.stage, _when(s.at), s.text] for s in steps],
        "status": [s.status for s in steps],
    }


def events(rows: Rows) -> list[dict[str, Any]]:
    """The rollout's events during the test, for marks on the A/B chart: time and label."""
    marks, share = [], 0.0
    for row in rows.decisions:
        if row["decision"] in ENDING:
            marks.append({"at": row["decided_at"], "label": row["decision"]})
        elif row["share"] != share:
            marks.append({"at": row["decided_at"], "label": f"share {row['share']:.0%}"})
            share = row["share"]
    return marks
