"""The online A/B test of a canary candidate against production, measured from the quality events
themselves: answers per arm from the producers' count records, low-score answers among them, one
sequential test (mSPRT, `qe_assets.rollout.sequential`) read after every run."""

from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.annotate.assets import annotated_samples
from qe_assets.finetune.serving.resource import ModelServerResource
from qe_assets.ingest.assets import raw_events
from qe_assets.lib.resources import PipelineSettings, duckdb_reader, duckdb_writer
from qe_assets.lib.stages import RELEASE_GROUP
from qe_assets.rollout import registry as ab
from qe_assets.rollout import timeline
from qe_assets.rollout.sequential import (
    PROMOTE,
    ROLLBACK,
    Arms,
    Decision,
    Distance,
    decide,
    distance_to_decision,
    policy_of,
)
from qe_assets.service.rollout import RolloutState, read_state, state_path
from qe_assets.settings import Settings
from qe_assets.store import transaction
from qe_assets.store.evaluations import production_model, record_promotion

HARM_CHECK = "candidate_not_worse"


@dataclass(frozen=True)
class Look:
    """One look at the running test (None fields: no test is running)."""

    state: RolloutState
    test: ab.ActiveTest | None = None
    arms: Arms | None = None
    decision: Decision | None = None
    per_label: dict[str, dict[str, Any]] | None = None
    ignored: dict[str, int] | None = None
    history: list[dict[str, Any]] | None = None
    distance: Distance | None = None  # how far the running test is from a decision
    steps: list[timeline.Step] | None = None  # the release timeline after this look


def per_label_rates(counts: dict[str, dict[str, int]], arms: Arms) -> dict[str, dict[str, Any]]:
    """Low-score events per label and arm, as a share of the arm's answers."""

    def rate(n: int, answers: int) -> float | None:
        return round(n / answers, 5) if answers else None

    return {
        label: {
            "production": n["production"],
            "candidate": n["candidate"],
            "rate_production": rate(n["production"], arms.answers_production),
            "rate_candidate": rate(n["candidate"], arms.answers_candidate),
        }
        for label, n in counts.items()
    }


def served_base_url(settings: Settings) -> str | None:
    """Where the model server serves its models for the RAG service (rollout.json's
    `base_urls`)."""
    return ModelServerResource.from_settings(settings).route_url


def look_at_test(
    conn: duckdb.DuckDBPyConnection, settings: Settings, run_id: str | None, *, record: bool = True
) -> Look:
    """Decide on the running test, record the decision (and a promotion), in one transaction;
    then write rollout.json from the tables. Without a test only the file is synced.

    `record=False` only reads: what the test looks like now (the gate and `qe models` report it
    as an `ab_test` materialization right after they change the rollout)."""
    path = state_path(settings)
    test = ab.active_test(conn)
    production = production_model(conn)
    if record and test is not None and production is not None and production != test.production:
        # Someone promoted another model meanwhile: the production arm no longer gets traffic.
        ab.stop_test(
            conn,
            test,
            ab.AB_TEST,
            f"production changed to {production} during the test; stopped (give the candidate "
            "traffic again with `qe models rollout`)",
            decision=ab.SET_SHARE,
        )
        test = None
    url = served_base_url(settings)
    state = ab.sync_state_file(conn, path, url) if record else ab.current_state(conn, url)
    if test is None:
        return Look(
            state,
            history=ab.newest_test_rows(conn),
            steps=timeline.release_timeline(timeline.read_rows(conn)),
        )
    policy = policy_of(settings)
    arms = ab.arm_counts(conn, test)
    decision = decide(arms, test.share, test.answers_at_share, policy)
    per_label = per_label_rates(ab.label_counts(conn, test, settings.capture_threshold), arms)
    # No answer counted since the last look and nothing to change: no row (and no new look).
    if record and not ab.nothing_new(conn, arms, decision):
        with transaction(conn):
            ab.record_test_decision(conn, test, arms, decision, per_label, run_id)
            if decision.decision == PROMOTE:
                record_promotion(
                    conn,
                    test.candidate,
                    ab.AB_TEST,
                    evaluation_id=ab.gate_passed(conn, test.candidate),
                    reason=decision.reason,
                )
        state = ab.sync_state_file(conn, path, url)
    ended = decision.decision in (PROMOTE, ROLLBACK)
    distance = None if ended else distance_to_decision(arms, decision.share, policy)
    steps = timeline.release_timeline(
        timeline.read_rows(conn), distance.text() if distance is not None else None
    )
    return Look(
        state,
        test,
        arms,
        decision,
        per_label,
        ab.unknown_models(conn, test),
        ab.newest_test_rows(conn),
        distance,
        steps,
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def rate_text(low: int, answers: int) -> str:
    """A rate as people read it: a percentage with its counts."""
    return f"{low / answers:.1%} ({low:,} of {answers:,})" if answers else f"n/a (0 of {low:,})"


def history_markdown(rows: list[dict[str, Any]], threshold: float) -> str:
    """Both arms' rates after each decision of the test (newest 30): the rates over time."""
    lines = [
        "| decided at (UTC) | decision | share after | production low-score rate | "
        f"candidate low-score rate | Λ (decides at {threshold:g}) | by |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows[-30:]:
        statistic = "" if row["statistic"] is None else f"{row['statistic']:.1f} of {threshold:g}"
        lines.append(
            f"| {row['decided_at']:%Y-%m-%d %H:%M:%S} | {row['decision']} | {row['share']:.0%} "
            f"| {rate_text(row['low_production'], row['answers_production'])} "
            f"| {rate_text(row['low_candidate'], row['answers_candidate'])} | {statistic} "
            f"| {row['decided_by']} |"
        )
    return "\n".join(lines)


def labels_markdown(per_label: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| label | production events | production rate | candidate events | candidate rate |",
        "|---|---|---|---|---|",
    ]
    for label, row in sorted(per_label.items()):
        lines.append(
            f"| {label} | {row['production']} | {_pct(row['rate_production'])} "
            f"| {row['candidate']} | {_pct(row['rate_candidate'])} |"
        )
    return "\n".join(lines)


# What the asset page shows first: what happened, how far from a decision, the timeline.
FIRST = ("decision", "reason", "progress", "release_timeline", "current_share", "candidate")


def look_metadata(look: Look, threshold: float) -> "dict[str, dg.RawMetadataValue]":
    """In the order the page reads best (FIRST, then the rest)."""
    metadata = _look_metadata(look, threshold)
    return {k: metadata[k] for k in FIRST if k in metadata} | metadata


def _look_metadata(look: Look, threshold: float) -> "dict[str, dg.RawMetadataValue]":
    """What the asset page shows: the state, the timeline, the decision with its threshold and
    distance, the rates as percentages with counts. `threshold`: 1 / QE_AB_ALPHA."""
    state = look.state
    metadata: dict[str, dg.RawMetadataValue] = {
        "production": state.production or "",
        "candidate": state.candidate or "",
        "current_share": state.share,
        "decision_threshold": threshold,
        "rollout_file": dg.MetadataValue.json(
            {k: v for k, v in state.__dict__.items() if v is not None}
        ),
    }
    if look.steps:
        metadata["release_timeline"] = dg.MetadataValue.md(timeline.markdown(look.steps))
    if look.history:
        metadata["rates_over_time"] = dg.MetadataValue.md(history_markdown(look.history, threshold))
    if look.test is None or look.arms is None or look.decision is None:
        metadata["decision"] = "none"
        last = look.history[-1] if look.history else None
        ended = (
            f"; the last test ({last['candidate']}) ended: {last['decision']} by "
            f"{last['decided_by']}"
            if last
            else ""
        )
        metadata["reason"] = (
            "no candidate has traffic"
            + (f"; production is {state.production}" if state.production else "")
            + ended
        )
        return metadata
    arms, decision = look.arms, look.decision
    if look.distance is not None:
        metadata["progress"] = look.distance.text()
        if look.distance.more_answers is not None:
            metadata["more_candidate_answers"] = look.distance.more_answers
    metadata.update(
        {
            "decision": decision.decision,
            "reason": decision.reason,
            "production_low_score_rate": rate_text(arms.low_production, arms.answers_production),
            "candidate_low_score_rate": rate_text(arms.low_candidate, arms.answers_candidate),
            "tested_candidate": look.test.candidate,
            "tested_production": look.test.production,
            "answers_production": arms.answers_production,
            "answers_candidate": arms.answers_candidate,
            "low_production": arms.low_production,
            "low_candidate": arms.low_candidate,
            # Floats: the UI plots these across materializations (the rates over time).
            "rate_production": float(arms.rate_production or 0.0),
            "rate_candidate": float(arms.rate_candidate or 0.0),
            "statistic": round(decision.statistic, 2),
            "test_started_at": f"{look.test.started_at:%Y-%m-%d %H:%M:%S} UTC",
        }
    )
    if look.per_label:
        metadata["per_label"] = dg.MetadataValue.md(labels_markdown(look.per_label))
    if look.ignored:
        metadata["ignored_models"] = dg.MetadataValue.json(look.ignored)
    return metadata


@dg.asset(
    deps=[raw_events, annotated_samples],
    group_name=RELEASE_GROUP,
    kinds={"duckdb", "python"},
    description=(
        "The online A/B test of the canary candidate (QE_ROLLOUT=canary, or `qe models "
        "rollout`) against production, from the quality events themselves: answers and "
        "low-score answers (score < QE_CAPTURE_THRESHOLD) per model from the producers' count "
        "records (`answer_counts`), per-label rates from the arms' events, and an mSPRT that "
        "stays valid however often it is read. Decides promote (the candidate becomes "
        "production in `promoted_models`, by ab_test), rollback (share 0) or continue (and the "
        "next share of QE_AB_RAMP when safe); records each look in `ab_decisions` and writes "
        "`$QE_DATA_DIR/rollout.json`, which `qe_assets.service.choose_model` routes by. "
        "Runs with every ingest run (queue sensor, `qe run`)."
    ),
)
def ab_test(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    with duckdb_writer(duckdb) as conn:
        look = look_at_test(conn, settings, context.run.run_id)
    if look.decision is not None and look.test is not None:
        context.log.info(
            f"A/B {look.test.candidate} vs {look.test.production}: {look.decision.decision} "
            f"({look.decision.reason}); share now {look.state.share:.0%}"
        )
    return dg.MaterializeResult(metadata=look_metadata(look, 1.0 / settings.ab_alpha))


def rollout_changed(
    conn: duckdb.DuckDBPyConnection, settings: Settings, by: str, what: str
) -> dg.AssetMaterialization:
    """`ab_test` as it stands right after the gate or a person changed the rollout (reported by
    them, so the asset page never disagrees with rollout.json until the next ingest)."""
    look = look_at_test(conn, settings, None, record=False)
    metadata = look_metadata(look, 1.0 / settings.ab_alpha)
    metadata["changed_by"] = by
    metadata["change"] = what
    return dg.AssetMaterialization(
        asset_key=dg.AssetKey("ab_test"),
        description=f"rollout changed by {by}: {what}",
        metadata=metadata,
    )


def report_rollout_change(
    instance: dg.DagsterInstance, event: dg.AssetMaterialization
) -> str | None:
    """Record `event` in Dagster (no run); a problem as one line (the change itself stands: it
    is in the tables and rollout.json, and the next ab_test run reports it anyway)."""
    try:
        instance.report_runless_asset_event(event)
    # Any failure: the Dagster instance is only told, never needed.
    except Exception as exc:
        return f"could not report the change to Dagster ({type(exc).__name__}: {exc})"
    return None


@dg.asset_check(
    asset=ab_test,
    name=HARM_CHECK,
    description=(
        "Warns when the candidate's low-score rate is significantly worse than production's "
        "(the mSPRT rejects equal rates at QE_AB_ALPHA with the candidate worse: Λ ≥ "
        "1/QE_AB_ALPHA); the same evidence rolls the candidate back to share 0. Judges this "
        "run's look, else the running test's newest one; with no test running it says so and "
        "records nothing to plot."
    ),
)
def candidate_not_worse(
    context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.AssetCheckResult:
    threshold = 1.0 / settings.ab_alpha
    with duckdb_reader(duckdb) as conn:  # reads only: no writer lock
        row = None if conn is None else ab.newest_look(conn, context.run.run_id)
        running = conn is not None and ab.active_test(conn) is not None
    if row is None:
        return dg.AssetCheckResult(passed=True, description="the A/B test has not looked yet")
    if not running and row["dagster_run_id"] != context.run.run_id:
        # The test ended in an earlier run (which judged its last look): nothing new to judge,
        # and no metadata, so the check's plots do not grow flat repeated points.
        return dg.AssetCheckResult(
            passed=True,
            description=(
                f"no test running (the last one, {row['candidate']}, ended: {row['decision']})"
            ),
        )
    worse = row["decision"] == ROLLBACK
    verdict = "significantly worse" if worse else "not significantly worse"
    statistic = float(row["statistic"] or 0.0)
    return dg.AssetCheckResult(
        passed=not worse,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{row['candidate']} {verdict} (Λ {statistic:.1f} of {threshold:g} needed to "
            f"decide): {row['reason']}"
        ),
        metadata={
            "candidate": row["candidate"],
            "production": row["production"],
            "decision": row["decision"],
            "candidate_low_score_rate": rate_text(row["low_candidate"], row["answers_candidate"]),
            "production_low_score_rate": rate_text(
                row["low_production"], row["answers_production"]
            ),
            "rate_candidate": float(row["rate_candidate"] or 0.0),
            "rate_production": float(row["rate_production"] or 0.0),
            "statistic": round(statistic, 2),
            "decision_threshold": threshold,
            "alpha": settings.ab_alpha,
        },
    )


def quiet_checks(
    instance: dg.DagsterInstance, settings: Settings | PipelineSettings
) -> frozenset[dg.AssetCheckKey]:
    """The checks of a running test to leave out of the next ingest run: with no test running
    (rollout.json gives no candidate a share), `candidate_not_worse` says so once (a result
    without metadata) and is then left out until a test starts again, so its history shows one
    "no test running" and not one per ingest. In doubt (an unreadable rollout.json, no
    Dagster history) the check runs."""
    key = dg.AssetCheckKey(dg.AssetKey("ab_test"), HARM_CHECK)
    try:
        state = read_state(state_path(settings))
        if state is not None and state.candidate and state.share > 0:
            return frozenset()
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    # Whatever goes wrong, the check simply runs as it always did.
    except Exception:
        return frozenset()
    event = record.event if record is not None else None
    data = event.dagster_event.event_specific_data if event and event.dagster_event else None
    evaluation = getattr(data, "evaluation", data)
    # A passed result without metadata is the "nothing to judge" one: it has been given already.
    said = isinstance(evaluation, dg.AssetCheckEvaluation) and evaluation.passed
    return frozenset({key}) if said and not evaluation.metadata else frozenset()
