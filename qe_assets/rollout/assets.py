"""The online A/B test of a canary candidate against production, measured from the quality events
themselves: answers per arm from the producers' count records, low-score answers among them, one
sequential test (mSPRT, `qe_assets.rollout.sequential`) read after every run."""

from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.annotate.assets import annotated_samples
from qe_assets.ingest.assets import raw_events
from qe_assets.lib.resources import PipelineSettings, duckdb_reader, duckdb_writer
from qe_assets.lib.stages import RELEASE_GROUP
from qe_assets.rollout import registry as ab
from qe_assets.rollout.sequential import PROMOTE, ROLLBACK, Arms, Decision, decide, policy_of
from qe_assets.service.rollout import RolloutState, state_path
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


def look_at_test(conn: duckdb.DuckDBPyConnection, settings: Settings, run_id: str | None) -> Look:
    """Decide on the running test, record the decision (and a promotion), in one transaction;
    then write rollout.json from the tables. Without a test only the file is synced."""
    path = state_path(settings)
    test = ab.active_test(conn)
    production = production_model(conn)
    if test is not None and production is not None and production != test.production:
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
    if test is None:
        return Look(ab.sync_state_file(conn, path), history=ab.newest_test_rows(conn))
    arms = ab.arm_counts(conn, test)
    decision = decide(arms, test.share, test.answers_at_share, policy_of(settings))
    per_label = per_label_rates(ab.label_counts(conn, test, settings.capture_threshold), arms)
    # No answer counted since the last look and nothing to change: no row (and no new look).
    if not ab.nothing_new(conn, arms, decision):
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
    return Look(
        ab.sync_state_file(conn, path),
        test,
        arms,
        decision,
        per_label,
        ab.unknown_models(conn, test),
        ab.newest_test_rows(conn),
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def history_markdown(rows: list[dict[str, Any]]) -> str:
    """Both arms' rates after each decision of the test: the rates over time."""
    lines = [
        "| decided at (UTC) | decision | share | production rate (answers) | "
        "candidate rate (answers) | Λ | by |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows[-30:]:
        statistic = "" if row["statistic"] is None else f"{row['statistic']:.2f}"
        lines.append(
            f"| {row['decided_at']:%Y-%m-%d %H:%M:%S} | {row['decision']} | {row['share']:.0%} "
            f"| {_pct(row['rate_production'])} ({row['answers_production']}) "
            f"| {_pct(row['rate_candidate'])} ({row['answers_candidate']}) | {statistic} "
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


def look_metadata(look: Look) -> "dict[str, dg.RawMetadataValue]":
    state = look.state
    metadata: dict[str, dg.RawMetadataValue] = {
        "production": state.production or "",
        "candidate": state.candidate or "",
        "current_share": state.share,
        "rollout_file": dg.MetadataValue.json(
            {k: v for k, v in state.__dict__.items() if v is not None}
        ),
    }
    if look.history:
        metadata["rates_over_time"] = dg.MetadataValue.md(history_markdown(look.history))
    if look.test is None or look.arms is None or look.decision is None:
        metadata["decision"] = "none"
        metadata["reason"] = "no candidate has traffic" + (
            f"; production is {state.production}" if state.production else ""
        )
        return metadata
    arms, decision = look.arms, look.decision
    metadata.update(
        {
            "decision": decision.decision,
            "reason": decision.reason,
            "tested_candidate": look.test.candidate,
            "tested_production": look.test.production,
            "answers_production": arms.answers_production,
            "answers_candidate": arms.answers_candidate,
            "low_production": arms.low_production,
            "low_candidate": arms.low_candidate,
            # Floats: the UI plots these across materializations (the rates over time).
            "rate_production": float(arms.rate_production or 0.0),
            "rate_candidate": float(arms.rate_candidate or 0.0),
            "statistic": round(decision.statistic, 4),
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
        "`$QE_DATA_DIR/rollout.json`, which `qe_assets.service.rollout.choose_model` routes by. Runs "
        "with every ingest run (queue sensor, `qe run`)."
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
    return dg.MaterializeResult(metadata=look_metadata(look))


@dg.asset_check(
    asset=ab_test,
    name=HARM_CHECK,
    description=(
        "Warns when the candidate's low-score rate is significantly worse than production's "
        "(the mSPRT rejects equal rates at QE_AB_ALPHA with the candidate worse); the same "
        "evidence rolls the candidate back to share 0. Judges this run's look, else the "
        "newest one."
    ),
)
def candidate_not_worse(
    context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.AssetCheckResult:
    with duckdb_reader(duckdb) as conn:  # reads only: no writer lock
        row = None if conn is None else ab.newest_look(conn, context.run.run_id)
    if row is None:
        return dg.AssetCheckResult(passed=True, description="the A/B test has not looked yet")
    worse = row["decision"] == ROLLBACK
    verdict = "significantly worse" if worse else "not significantly worse"
    return dg.AssetCheckResult(
        passed=not worse,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{row['candidate']} {verdict}: {row['reason']}",
        metadata={
            "candidate": row["candidate"],
            "production": row["production"],
            "decision": row["decision"],
            "rate_candidate": float(row["rate_candidate"] or 0.0),
            "rate_production": float(row["rate_production"] or 0.0),
            "statistic": float(row["statistic"] or 0.0),
            "alpha": settings.ab_alpha,
        },
    )
