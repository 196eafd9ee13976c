"""The A/B rollout's tables: `answer_counts` (arms), `ab_decisions` (the state), rollout.json.

`ab_decisions` is append-only; its newest row is the rollout state: a candidate has traffic while
that row's share is above 0, its decision is neither `promote` nor `rollback`, and the candidate
is not production already. rollout.json is always written from these tables (`sync_state_file`),
so a lost or corrupt file is healed by the next run or `qe models` command.

The tables name a model by its id (`fine_tune_runs.model_id`); a model that the model server
serves (QE_MODEL_SERVER) is named in rollout.json by its served name (`model_rag_qa_v001`),
with the server's base URL, since that is what the RAG service calls and captures with
`model=`. Its answers are counted under either name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb

from qe_assets.rollout.sequential import CONTINUE, PROMOTE, ROLLBACK, Arms, Decision
from qe_assets.service.rollout import RolloutState, write_state
from qe_assets.store.evaluations import production_model, refuse_flagged

AB_TEST = "ab_test"
START, SET_SHARE = "start", "set_share"


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class ActiveTest:
    candidate: str
    production: str
    share: float
    started_at: datetime
    answers_at_share: int  # the candidate's answers when the share last changed
    # When the share changed during the test (oldest first): the arms are compared per period.
    share_changes: tuple[datetime, ...] = ()


def newest_test_rows(conn: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The rows of the newest test (same candidate and start), oldest first."""
    cursor = conn.execute(
        """
        WITH newest AS (
            SELECT candidate, test_started_at FROM ab_decisions
            ORDER BY decision_id DESC LIMIT 1)
        SELECT a.* FROM ab_decisions a JOIN newest USING (candidate, test_started_at)
        ORDER BY a.decision_id
        """
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def active_test(conn: duckdb.DuckDBPyConnection) -> ActiveTest | None:
    rows = newest_test_rows(conn)
    if not rows:
        return None
    last = rows[-1]
    if last["share"] <= 0 or last["decision"] in (PROMOTE, ROLLBACK):
        return None
    if last["candidate"] == production_model(conn):
        return None
    at_share = last["answers_candidate"]
    for row in reversed(rows):  # back to the first row of the current share
        if row["share"] != last["share"]:
            break
        at_share = row["answers_candidate"]
    changes = tuple(
        row["decided_at"] for before, row in pairwise(rows) if row["share"] != before["share"]
    )
    return ActiveTest(
        last["candidate"],
        last["production"],
        last["share"],
        last["test_started_at"],
        at_share,
        changes,
    )


def served_aliases(conn: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """model id (or base model) → the name the model server serves it under, as each run
    recorded it when the model was registered (`served_as`, `base_served_as` in its metrics)."""
    rows = conn.execute(
        """
        SELECT model_id, json_extract_string(metrics, '$.served_as'),
               base_model, json_extract_string(metrics, '$.base_served_as')
        FROM fine_tune_runs
        WHERE status = 'succeeded' AND model_id IS NOT NULL
        ORDER BY updated_at
        """
    ).fetchall()
    out: dict[str, str] = {}
    for model_id, served, base, base_served in rows:
        if served:
            out[model_id] = served
        if base and base_served:
            out[base] = base_served
    return out


def names_of(aliases: dict[str, str], model: str) -> list[str]:
    """The names a model's answers may be counted under: its id and its served name."""
    return [model, aliases[model]] if model in aliases else [model]


def arm_counts(conn: duckdb.DuckDBPyConnection, test: ActiveTest) -> Arms:
    """Both arms' answers and low-score answers counted since the test started, per period of
    constant share (a flush belongs to the period its window ended in)."""
    periods = [[0, 0, 0, 0] for _ in range(len(test.share_changes) + 1)]
    aliases = served_aliases(conn)
    production = names_of(aliases, test.production)
    for is_production, period, answers, low in conn.execute(
        """
        SELECT list_contains($production, model),
               len(list_filter($changes::TIMESTAMP[], lambda c: c < window_end)),
               sum(answers), sum(low)
        FROM answer_counts
        WHERE list_contains($names, model) AND window_end >= $started
        GROUP BY ALL
        """,
        {
            "changes": list(test.share_changes),
            "production": production,
            "names": [*production, *names_of(aliases, test.candidate)],
            "started": test.started_at,
        },
    ).fetchall():
        offset = 0 if is_production else 2
        periods[period][offset : offset + 2] = [int(answers), int(low)]
    return Arms.of_periods([(p[0], p[1], p[2], p[3]) for p in periods])


def label_counts(
    conn: duckdb.DuckDBPyConnection, test: ActiveTest, threshold: float
) -> dict[str, dict[str, int]]:
    """label → {"production": n, "candidate": n}: the arms' low-score events by primary label."""
    counts: dict[str, dict[str, int]] = {}
    aliases = served_aliases(conn)
    candidate = names_of(aliases, test.candidate)
    for model, label, n in conn.execute(
        """
        SELECT r.model, s.label, count(*) FROM raw_events r
        JOIN annotated_samples s USING (request_id)
        WHERE list_contains(?, r.model) AND r.timestamp >= ? AND r.score < ?
        GROUP BY ALL ORDER BY ALL
        """,
        [
            [*candidate, *names_of(aliases, test.production)],
            test.started_at,
            threshold,
        ],
    ).fetchall():
        arm = "candidate" if model in candidate else "production"
        counts.setdefault(label, {"production": 0, "candidate": 0})[arm] = int(n)
    return counts


def unknown_models(conn: duckdb.DuckDBPyConnection, test: ActiveTest) -> dict[str, int]:
    """Answers counted since the test started for models that are neither arm (ignored)."""
    aliases = served_aliases(conn)
    names = [*names_of(aliases, test.candidate), *names_of(aliases, test.production)]
    return dict(
        conn.execute(
            "SELECT model, sum(answers)::BIGINT FROM answer_counts "
            "WHERE NOT list_contains(?, model) AND window_end >= ? GROUP BY model ORDER BY model",
            [names, test.started_at],
        ).fetchall()
    )


def record_decision(
    conn: duckdb.DuckDBPyConnection,
    *,
    candidate: str,
    production: str,
    share: float,
    arms: Arms,
    decision: str,
    reason: str,
    by: str,
    started_at: datetime,
    statistic: float | None = None,
    per_label: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> None:
    conn.execute(
        """
        INSERT INTO ab_decisions (candidate, production, share, answers_production,
            low_production, answers_candidate, low_candidate, rate_production, rate_candidate,
            statistic, decision, reason, decided_by, test_started_at, per_label,
            dagster_run_id, decided_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """,
        [
            candidate,
            production,
            share,
            arms.answers_production,
            arms.low_production,
            arms.answers_candidate,
            arms.low_candidate,
            arms.rate_production,
            arms.rate_candidate,
            statistic,
            decision,
            reason,
            by,
            started_at,
            json.dumps(per_label, ensure_ascii=False) if per_label is not None else None,
            run_id,
            utc_now(),
        ],
    )


def nothing_new(conn: duckdb.DuckDBPyConnection, arms: Arms, decision: Decision) -> bool:
    """The test's last row already holds these counts, and the decision changes nothing."""
    rows = newest_test_rows(conn)
    if not rows or decision.decision != CONTINUE or decision.share != rows[-1]["share"]:
        return False
    last = rows[-1]
    return (
        last["answers_production"],
        last["low_production"],
        last["answers_candidate"],
        last["low_candidate"],
    ) == (arms.answers_production, arms.low_production, arms.answers_candidate, arms.low_candidate)


def record_test_decision(
    conn: duckdb.DuckDBPyConnection,
    test: ActiveTest,
    arms: Arms,
    decision: Decision,
    per_label: dict[str, Any],
    run_id: str | None,
) -> None:
    record_decision(
        conn,
        candidate=test.candidate,
        production=test.production,
        share=decision.share,
        arms=arms,
        decision=decision.decision,
        reason=decision.reason,
        by=AB_TEST,
        started_at=test.started_at,
        statistic=decision.statistic,
        per_label=per_label,
        run_id=run_id,
    )


def start_test(
    conn: duckdb.DuckDBPyConnection,
    candidate: str,
    production: str,
    share: float,
    by: str,
    reason: str,
    *,
    decision: str = START,
    run_id: str | None = None,
) -> None:
    """Give `candidate` traffic against `production` (a new test, or a new share of the running
    test of the same candidate, which keeps its start and its counts). Never a model `qe forget`
    flagged (`ModelFlagged`)."""
    if share > 0:
        refuse_flagged(conn, candidate)
    test = active_test(conn)
    same = test is not None and test.candidate == candidate and test.production == production
    started = test.started_at if same and test is not None else utc_now()
    arms = arm_counts(conn, test) if same and test is not None else Arms(0, 0, 0, 0)
    record_decision(
        conn,
        candidate=candidate,
        production=production,
        share=share,
        arms=arms,
        decision=decision if not same else SET_SHARE,
        reason=reason,
        by=by,
        started_at=started,
        run_id=run_id,
    )


def stop_test(
    conn: duckdb.DuckDBPyConnection,
    test: ActiveTest,
    by: str,
    reason: str,
    *,
    decision: str = ROLLBACK,
) -> None:
    """End the running test: share 0, production unchanged (a person's rollback by default)."""
    record_decision(
        conn,
        candidate=test.candidate,
        production=test.production,
        share=0.0,
        arms=arm_counts(conn, test),
        decision=decision,
        reason=reason,
        by=by,
        started_at=test.started_at,
    )


def newest_look(conn: duckdb.DuckDBPyConnection, run_id: str | None) -> dict[str, Any] | None:
    """The A/B test's decision of this Dagster run, else its newest decision; None before any."""
    cursor = conn.execute(
        "SELECT * FROM ab_decisions WHERE decided_by = ? "
        "ORDER BY (dagster_run_id IS NOT DISTINCT FROM ?) DESC, decision_id DESC LIMIT 1",
        [AB_TEST, run_id],
    )
    names = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    return dict(zip(names, rows[0], strict=True)) if rows else None


def gate_passed(conn: duckdb.DuckDBPyConnection, model: str) -> str | None:
    """The id of the newest gate evaluation of `model` when it passed (only such a candidate
    may get traffic), else None."""
    rows = conn.execute(
        "SELECT evaluation_id, decision FROM model_evaluations "
        "WHERE candidate = ? AND comparison = 'production' ORDER BY created_at DESC LIMIT 1",
        [model],
    ).fetchall()
    return rows[0][0] if rows and rows[0][1] == PROMOTE else None


def current_state(conn: duckdb.DuckDBPyConnection, base_url: str | None = None) -> RolloutState:
    """The state rollout.json should hold. Before any promotion, production is the model the
    newest test ran against (the base model the gate compared with). A model the model server
    serves goes by its served name, with `base_url` (the server's) when given."""
    state = state_by_id(conn)
    aliases = served_aliases(conn)
    served = set(aliases.values())

    def name(model: str | None) -> str | None:
        return aliases.get(model, model) if model is not None else None

    production, candidate = name(state.production), name(state.candidate)
    urls = {m: base_url for m in (production, candidate) if m in served and base_url}
    return replace(state, production=production, candidate=candidate, base_urls=urls)


def state_by_id(conn: duckdb.DuckDBPyConnection) -> RolloutState:
    test = active_test(conn)
    rows = conn.execute(
        "SELECT production, decision, decided_by, decided_at FROM ab_decisions "
        "ORDER BY decision_id DESC LIMIT 1"
    ).fetchall()
    tested, decision, by, at = rows[0] if rows else (None, None, None, None)
    production = production_model(conn) or tested
    stamp = at.isoformat() + "Z" if at is not None else None
    if test is None:
        return RolloutState(production, None, 0.0, decision, by, stamp)
    return RolloutState(production, test.candidate, test.share, decision, by, stamp)


def sync_state_file(
    conn: duckdb.DuckDBPyConnection, path: Path, base_url: str | None = None
) -> RolloutState:
    """Write rollout.json from the tables (atomically, only when it changes); before anything
    was promoted or tested, and with no file yet, nothing is written. `base_url`: where the
    model server serves its models (`ModelServerResource.route_url`)."""
    state = current_state(conn, base_url)
    if state.production is not None or state.candidate is not None or path.exists():
        write_state(path, state)
    return state
