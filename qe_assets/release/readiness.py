"""Which samples the next dataset version would take: shared by the export, the fine-tune sensor,
`qe run` and `qe status`, and free of Dagster so the CLI stays quick to start."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import duckdb

from qe_assets.release.dataset import BUCKETS
from qe_assets.settings import Settings

# Ready = a completion that is ok, written after the last version's watermark, for a sample that
# is not a duplicate, not waiting for a reviewer and not in any version yet.
_READY_CONDITIONS = """
    c.status = 'ok' AND c.completion IS NOT NULL
    AND s.duplicate_of IS NULL
    AND NOT EXISTS (
        SELECT 1 FROM review_queue r WHERE r.sample_id = c.sample_id AND r.status = 'pending'
    )
    AND NOT EXISTS (SELECT 1 FROM dataset_samples d WHERE d.sample_id = c.sample_id)
"""
READY = f"""
    FROM completions c JOIN annotated_samples s USING (sample_id)
    WHERE c.seq > $low AND c.seq <= $high AND {_READY_CONDITIONS}
"""

# The export reads the ready samples of one window of completions ($limit of them, by seq) at a
# time. annotated_samples is read only over the seq span of the window's samples, so its zone
# maps skip the rest of history: a plain join read every prompt ever written once per batch
# (measured in docs/performance.md).
_WINDOW = """
    SELECT seq, sample_id, completion, mode, status, judge_verdict FROM completions
    WHERE seq > $low AND seq <= $high ORDER BY seq LIMIT $limit
"""
READY_IN_WINDOW = f"""
    WITH c AS ({_WINDOW}),
    span AS (
        SELECT min(s.seq) AS first_seq, max(s.seq) AS last_seq
        FROM annotated_samples s SEMI JOIN c USING (sample_id)
    )
    SELECT c.seq AS completion_seq, c.sample_id, s.prompt, c.completion, s.label, s.confidence,
           s.score, s.language, s.question_key, c.mode, s.original_answer,
           -- An ok completion with a verdict is one the judge approved: a preference pair.
           c.judge_verdict IS NOT NULL AS judged
    FROM c JOIN annotated_samples s USING (sample_id)
    WHERE s.seq BETWEEN (SELECT first_seq FROM span) AND (SELECT last_seq FROM span)
      AND {_READY_CONDITIONS}
    -- Ingest order within the window: a version's files (and so what trains on them) do not
    -- depend on the order in which completions were committed.
    ORDER BY s.seq
"""
# Where the window ends, even when none of its completions is ready.
WINDOW_END = f"SELECT max(seq) FROM ({_WINDOW})"


@dataclass(frozen=True)
class VersionState:
    committed: list[str]
    next_number: int
    low: int  # completions.seq already covered by committed versions
    high: int  # newest completions.seq now


def version_state(conn: duckdb.DuckDBPyConnection) -> VersionState:
    committed = [r[0] for r in conn.execute("SELECT version FROM dataset_versions").fetchall()]
    # Past every number a cut ever claimed, committed or not (store.py, dataset_version_claims).
    ((number, low),) = conn.execute(
        "SELECT greatest(coalesce(max(number), 0), "
        "                (SELECT coalesce(max(number), 0) FROM dataset_version_claims)), "
        "       coalesce(max(max_completion_seq), 0) "
        "FROM dataset_versions"
    ).fetchall()
    ((high,),) = conn.execute("SELECT coalesce(max(seq), 0) FROM completions").fetchall()
    return VersionState(committed, int(number) + 1, int(low), int(high))


# Held out for evaluation: a question already in the frozen set, or one whose bucket falls in the
# evaluation share (the bucket rule of `transforms.dataset.assign_split`, in SQL). A question of
# the evaluation buckets that an earlier version already trained on stays in training at the cut;
# it is not looked up here (that needs a join over every exported sample on each sensor tick), so
# the count can be short by those, which only exist when QE_EVAL_SHARE was raised after a release.
_HELD_OUT = f"""
    (s.question_key IN (SELECT question_key FROM evaluation_set)
     OR ('0x' || left(s.question_key, 8))::UBIGINT % {BUCKETS} >= {BUCKETS} - $eval_buckets)
"""


def ready_sample_count(
    conn: duckdb.DuckDBPyConnection,
    state: VersionState | None = None,
    *,
    eval_share: float = 0.0,
) -> int:
    """Samples the next version would train on: what the fine-tune sensor compares to its
    threshold. Samples held out for evaluation (QE_EVAL_SHARE) never enter a training file, so
    they do not count towards it."""
    state = state or version_state(conn)
    ((count,),) = conn.execute(
        f"SELECT count(*) FILTER (WHERE NOT {_HELD_OUT}) {READY}",
        {"low": state.low, "high": state.high, "eval_buckets": round(eval_share * BUCKETS)},
    ).fetchall()
    return int(count)


@dataclass(frozen=True)
class ReleaseDecision:
    """Whether a release run (publish a version, check it, fine-tune on it) is due, and on what.

    `version` is what the run will publish: a committed version that has no finished run for the
    backend (published again from its manifest, no new cut), else the next version to cut.
    """

    due: bool
    version: str | None
    republish: bool
    ready: int
    reason: str
    state: VersionState
    # The model whose gate is evaluated again (its release never reached a decision, or it was
    # insufficient_data from failed items): the run is `model_evaluation` alone.
    gate: str | None = None
    gate_attempts: int = 0


def release_decision(
    conn: duckdb.DuckDBPyConnection,
    threshold: int,
    backend: str,
    *,
    cut_version: bool = False,
    eval_share: float = 0.0,
) -> ReleaseDecision:
    """The one release rule, shared by the sensor and `qe run`: release a committed version whose
    release never ended (no run for the backend, or a `running` one whose process died), else cut
    a new one when the ready samples reach the threshold (or when asked to); a version whose run
    failed is retried at the next release, before any newer version is cut."""
    from qe_assets.store.finetune_runs import handed_over, pending_version

    state = version_state(conn)
    ready = ready_sample_count(conn, state, eval_share=eval_share)
    pending = pending_version(conn, backend)

    def decide(due: bool, reason: str, version: str | None = pending) -> ReleaseDecision:
        republish = pending is not None and version == pending
        return ReleaseDecision(due, version, republish, ready, reason, state)

    if pending is not None and not handed_over(conn, pending, backend):
        return decide(True, f"{pending} is committed but its {backend} release never ended")
    if pending is None and ready == 0:
        return decide(False, "no sample ready for a new dataset version")
    if not cut_version and ready < threshold:
        return decide(
            False,
            f"{ready} ready samples, below the threshold of {threshold}",
        )
    if pending is not None:
        return decide(True, f"{pending} has no finished {backend} run: released again first")
    return decide(True, f"{ready} samples ready", version=f"v{state.next_number:03d}")


def settings_release_decision(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    *,
    cut_version: bool = False,
    backend: str | None = None,
    resume_gate: bool = False,
) -> ReleaseDecision:
    """`release_decision` with the threshold, backend and hold-out share of `settings`: what the
    sensor, `qe run` and `tuning_dataset` each ask. `backend` is the run's fine-tune backend
    resource's (which a launchpad override may set apart from the settings). `resume_gate` (the
    sensor and `qe run`): a release whose evaluation never reached a decision is due too, right
    after a version whose release never ended (`gate_decision`)."""
    backend = backend or settings.finetune_backend
    decision = release_decision(
        conn,
        settings.finetune_threshold,
        backend,
        cut_version=cut_version,
        eval_share=settings.eval_share,
    )
    if not resume_gate or (decision.republish and decision.due):
        return decision
    return gate_decision(conn, settings, backend, decision)


def gate_configured(settings: Settings) -> bool:
    """Whether `model_evaluation` can run at all (it skips, and the release ends, without a judge
    model or OPENAI_API_KEY): otherwise a missing evaluation is nothing to resume."""
    judge = settings.eval_judge_model or settings.llm_judge_model or settings.llm_model
    return bool(judge) and bool(os.environ.get("OPENAI_API_KEY"))


def gate_decision(
    conn: duckdb.DuckDBPyConnection, settings: Settings, backend: str, otherwise: ReleaseDecision
) -> ReleaseDecision:
    """A release that evaluates the newest model again when its gate never ended (issue #26: a
    kill during or right after the evaluation, or a judge outage), else `otherwise`."""
    from qe_assets.store.evaluations import gate_pending

    if not gate_configured(settings):
        return otherwise
    try:
        pending = gate_pending(conn, backend)
    except (duckdb.CatalogException, duckdb.BinderException):
        # A read-only look at a store from before the gate or its retry columns: the next write
        # connection adds them.
        return otherwise
    if pending is None:
        return otherwise
    return replace(
        otherwise,
        due=True,
        version=pending.candidate.dataset_version,
        republish=False,
        reason=pending.reason,
        gate=pending.candidate.model_id,
        gate_attempts=pending.attempts,
    )


def release_while_due(
    settings: Settings,
    release: Callable[[ReleaseDecision], bool],
    *,
    cut_version: bool = False,
) -> tuple[list[ReleaseDecision], ReleaseDecision]:
    """Call `release` (one release run) per due version until none is due or one fails:
    committed versions a killed run never released go first, oldest first, then at most one new
    cut. Returns the decisions acted on and the last one, which was not."""
    from qe_assets.store import connect

    done: list[ReleaseDecision] = []
    while True:
        with connect(settings.database, read_only=True) as conn:
            decision = settings_release_decision(
                conn, settings, cut_version=cut_version, resume_gate=True
            )
        seen = {(d.version, d.gate) for d in done}
        if not decision.due or (decision.version, decision.gate) in seen:
            return done, decision
        done.append(decision)
        if not release(decision):
            return done, decision
        # One new cut per call; republishing or resuming a gate cut nothing.
        cut_version = cut_version and (decision.republish or decision.gate is not None)
