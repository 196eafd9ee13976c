"""The gate's tables: the evaluation set's prompts, evaluations, items, and `promoted_models`.

`promoted_models` is append-only and its newest row names the production model, whether a gate,
a person's promotion or a rollback wrote it; the A/B rollout reads it the same way
(`production_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from qe_assets.store import select_frame

GATE = "gate"
# Evaluations of one comparison that may end in insufficient_data from failed items (the judge or
# the endpoint down) before the gate stops retrying on its own; `qe models list` shows the count.
GATE_MAX_ATTEMPTS = 3
PROMOTE_ACTION, ROLLBACK_ACTION = "promote", "rollback"
# A reference answer is one a person wrote or a judge approved (ok after judging).
_ITEMS = """
    SELECT e.sample_id, s.label, s.language, s.prompt, s.question,
           list_transform(s.context_docs, lambda d: d.content) AS documents,
           CASE WHEN c.status = 'ok' AND (c.mode = 'human' OR (c.mode = 'llm'
                     AND c.judge_model IS NOT NULL)) THEN c.completion END AS reference
    FROM evaluation_set e JOIN annotated_samples s USING (sample_id)
    LEFT JOIN completions c USING (sample_id)
    ORDER BY e.sample_id
"""


@dataclass(frozen=True)
class Candidate:
    model_id: str
    dataset_version: str
    base_model: str | None
    run_id: str


def latest_candidate(conn: duckdb.DuckDBPyConnection, backend: str) -> Candidate | None:
    """The newest model the backend trained: what the gate evaluates."""
    rows = conn.execute(
        """
        SELECT r.model_id, r.dataset_version, r.base_model, r.run_id FROM fine_tune_runs r
        JOIN dataset_versions v ON v.version = r.dataset_version
        WHERE r.backend = ? AND r.status = 'succeeded' AND r.model_id IS NOT NULL
        ORDER BY v.number DESC, r.updated_at DESC LIMIT 1
        """,
        [backend],
    ).fetchall()
    return Candidate(*rows[0]) if rows else None


def production_model(conn: duckdb.DuckDBPyConnection) -> str | None:
    """The model in production: the newest `promoted_models` row; None when none was ever
    promoted."""
    rows = conn.execute(
        "SELECT model FROM promoted_models ORDER BY promotion_id DESC LIMIT 1"
    ).fetchall()
    return rows[0][0] if rows else None


def evaluation_items(conn: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """The frozen set's prompts with what the judge needs (reference answer when there is one)."""
    return select_frame(conn, _ITEMS)


def cached_answers(conn: duckdb.DuckDBPyConnection, models: list[str]) -> dict[str, str]:
    """cache_key → content of the evaluation calls these models already answered."""
    rows = conn.execute(
        "SELECT cache_key, content FROM llm_cache "
        "WHERE purpose IN ('eval_answer', 'eval_judge') AND model IN ?",
        [models],
    ).fetchall()
    return dict(rows)


def icl_examples(conn: duckdb.DuckDBPyConnection, version: str, k: int) -> list[dict[str, str]]:
    """k (prompt, completion) pairs of the version's train split as chat turns: the ICL
    baseline's examples. Chosen by a hash of the sample id, so every run shows the same ones."""
    rows = conn.execute(
        """
        SELECT s.prompt, c.completion FROM dataset_samples d
        JOIN annotated_samples s USING (sample_id) JOIN completions c USING (sample_id)
        WHERE d.version = ? AND d.split = 'train' AND c.completion IS NOT NULL
        ORDER BY md5(d.sample_id) LIMIT ?
        """,
        [version, k],
    ).fetchall()
    turns: list[dict[str, str]] = []
    for prompt, completion in rows:
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return turns


def save_evaluation(conn: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
    """Insert or replace one evaluation (a re-run of the same comparison replaces its row and
    counts one more attempt)."""
    before = conn.execute(
        "SELECT attempts FROM model_evaluations WHERE evaluation_id = ?", [row["evaluation_id"]]
    ).fetchall()
    attempts = (before[0][0] or 1) + 1 if before else 1
    values = {
        **row,
        "per_label": json.dumps(row["per_label"], ensure_ascii=False),
        "attempts": attempts,
    }
    columns = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    conn.execute(
        f"INSERT OR REPLACE INTO model_evaluations ({columns}, created_at) "
        f"VALUES ({marks}, now()::TIMESTAMP)",
        list(values.values()),
    )


def evaluation_of_run(conn: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    rows = select_frame(
        conn,
        "SELECT * FROM model_evaluations WHERE dagster_run_id = ? "
        "AND comparison = 'production' ORDER BY created_at DESC LIMIT 1",
        [run_id],
    ).rows(named=True)
    return rows[0] if rows else None


class ModelFlagged(ValueError):
    """The model was trained on data a person asked to be forgotten (`qe forget`)."""


# The reason a flagged candidate's gate decision (`block`) records: it says why without a run.
FLAGGED_REASON = "flagged by qe forget: trained on forgotten data"


def flagged_reason(conn: duckdb.DuckDBPyConnection, model: str) -> str | None:
    """Why `qe forget` flagged the model (its version and forget id), or None: not flagged."""
    rows = conn.execute(
        "SELECT dataset_version, forget_id FROM flagged_models WHERE model = ? LIMIT 1", [model]
    ).fetchall()
    if not rows:
        return None
    return f"{FLAGGED_REASON} ({rows[0][0]}, forget {rows[0][1]})"


def refuse_flagged(conn: duckdb.DuckDBPyConnection, model: str) -> None:
    """Raise `ModelFlagged` for a model `qe forget` flagged: no promotion, no traffic."""
    rows = conn.execute(
        "SELECT dataset_version, forget_id FROM flagged_models WHERE model = ? LIMIT 1", [model]
    ).fetchall()
    if rows:
        raise ModelFlagged(
            f"{model} is flagged: it was trained on {rows[0][0]}, which held data a person asked "
            f"to be forgotten (forget {rows[0][1]}); it is never promoted nor given traffic"
        )


def record_promotion(
    conn: duckdb.DuckDBPyConnection,
    model: str,
    by: str,
    *,
    action: str = PROMOTE_ACTION,
    evaluation_id: str | None = None,
    reason: str | None = None,
) -> None:
    if action == PROMOTE_ACTION:
        refuse_flagged(conn, model)
    conn.execute(
        "INSERT INTO promoted_models (model, promoted_at, promoted_by, evaluation_id, action, "
        "reason) VALUES (?, now()::TIMESTAMP, ?, ?, ?, ?)",
        [model, by, evaluation_id, action, reason],
    )


def rollback_target(conn: duckdb.DuckDBPyConnection) -> str | None:
    """The model that was in production before the current one, or None (nothing to roll back
    to). Promotions stack up and a rollback pops one, so two rollbacks in a row go two
    promotions back."""
    stack: list[str] = []
    rows = conn.execute(
        "SELECT model, action FROM promoted_models ORDER BY promotion_id"
    ).fetchall()
    for model, action in rows:
        if action == ROLLBACK_ACTION and stack:
            stack.pop()
        if not stack or stack[-1] != model:
            stack.append(model)
    return stack[-2] if len(stack) >= 2 else None


@dataclass(frozen=True)
class GatePending:
    """The newest model, whose gate never reached a decision that ends its release."""

    candidate: Candidate
    attempts: int  # evaluations that ended in a retry so far (0: none committed yet)
    reason: str


def gate_pending(conn: duckdb.DuckDBPyConnection, backend: str) -> GatePending | None:
    """Whether the newest model's release is unfinished at the gate: no committed evaluation
    (killed during it), insufficient_data because too many items failed (fewer than
    GATE_MAX_ATTEMPTS times so far), or a `promote` that neither promotion nor canary followed
    (a store written before the decision and the promotion were one transaction). Never a
    model `qe forget` flagged."""
    candidate = latest_candidate(conn, backend)
    if candidate is None or production_model(conn) == candidate.model_id:
        return None
    if flagged_reason(conn, candidate.model_id) is not None:
        # Nothing left to decide: `qe forget` flagged it, no evaluation could promote it, and a
        # release resumed for it would be resumed at every tick for ever.
        return None
    rows = conn.execute(
        "SELECT decision, retry, attempts FROM model_evaluations "
        "WHERE candidate = ? AND comparison = 'production' ORDER BY created_at DESC LIMIT 1",
        [candidate.model_id],
    ).fetchall()
    model = candidate.model_id
    if not rows:
        return GatePending(candidate, 0, f"{model} has no committed evaluation: evaluated again")
    decision, retry, attempts = rows[0][0], bool(rows[0][1]), int(rows[0][2] or 1)
    if decision == "insufficient_data" and retry and attempts < GATE_MAX_ATTEMPTS:
        return GatePending(
            candidate,
            attempts,
            f"{model}: insufficient_data from failed items after {attempts} of "
            f"{GATE_MAX_ATTEMPTS} evaluations: evaluated again",
        )
    if decision == PROMOTE_ACTION and not _acted_on(conn, model):
        return GatePending(candidate, attempts, f"{model} passed the gate but was never promoted")
    return None


def _acted_on(conn: duckdb.DuckDBPyConnection, model: str) -> bool:
    """The model was ever promoted, rolled back or given traffic (a person's act counts too)."""
    rows = conn.execute(
        "SELECT 1 FROM promoted_models WHERE model = ? "
        "UNION ALL SELECT 1 FROM ab_decisions WHERE candidate = ? LIMIT 1",
        [model, model],
    ).fetchall()
    return bool(rows)


MODELS_QUERY = f"""
    WITH latest_eval AS (
        SELECT * FROM model_evaluations WHERE comparison = 'production'
        QUALIFY row_number() OVER (PARTITION BY candidate ORDER BY created_at DESC) = 1
    ),
    production AS (SELECT model FROM promoted_models ORDER BY promotion_id DESC LIMIT 1)
    SELECT r.model_id AS model, r.dataset_version, r.backend,
           e.decision, round(e.win_rate, 3) AS win_rate, round(e.ci_low, 3) AS ci_low, e.n,
           e.baseline, r.model_id IN (SELECT model FROM production) AS production,
           CASE WHEN e.retry AND e.attempts < {GATE_MAX_ATTEMPTS}
                    THEN 'retry (' || e.attempts || ' of {GATE_MAX_ATTEMPTS})'
                WHEN e.retry THEN 'gave up after ' || e.attempts
                WHEN e.decision IS NULL THEN 'not evaluated' END AS gate,
           r.model_id IN (SELECT model FROM flagged_models) AS flagged
    FROM fine_tune_runs r LEFT JOIN latest_eval e ON e.candidate = r.model_id
    WHERE r.status = 'succeeded' AND r.model_id IS NOT NULL
    UNION ALL
    SELECT p.model, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true, NULL,
           p.model IN (SELECT model FROM flagged_models)
    FROM production p
    WHERE p.model NOT IN (SELECT model_id FROM fine_tune_runs WHERE model_id IS NOT NULL)
    ORDER BY dataset_version NULLS FIRST, model
"""


def known_model(conn: duckdb.DuckDBPyConnection, model: str) -> bool:
    """A model a person may promote: one we trained, a base model we trained from, or one that
    was in production before."""
    rows = conn.execute(
        "SELECT 1 FROM fine_tune_runs WHERE (model_id = ? AND status = 'succeeded') "
        "OR base_model = ? UNION ALL SELECT 1 FROM promoted_models WHERE model = ?",
        [model, model, model],
    ).fetchall()
    return bool(rows)
