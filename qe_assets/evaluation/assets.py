"""Stage 6, the evaluation gate: the newest fine-tuned model against production on the frozen
evaluation set, judged pairwise; promoted (in the same transaction as the decision) only when it
measurably wins; the blocking check reports the decision."""

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource

from qe_assets.evaluation.endpoints import (
    judge_endpoint,
    judge_model,
    local_judge,
    models_endpoint,
)
from qe_assets.evaluation.engine import ItemResult, Pairing, evaluate_pairs
from qe_assets.evaluation.metrics import BLOCK, INSUFFICIENT, PROMOTE, Decision, Tally, label_table
from qe_assets.evaluation.parity import probe
from qe_assets.evaluation.report import (
    CACHE_COLUMNS,
    ITEM_COLUMNS,
    cache_frame,
    error_counts,
    evaluation_id,
    examples_markdown,
    item_frame,
    per_label_json,
    spend,
    summarize,
)
from qe_assets.finetune.assets import fine_tuned_model
from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.finetune.serving.resource import ModelServerResource, served_names
from qe_assets.lib.links import dashboard_url
from qe_assets.lib.resources import OpenAIResource, PipelineSettings, duckdb_reader, duckdb_writer
from qe_assets.lib.templates import load_templates
from qe_assets.rollout import timeline
from qe_assets.rollout.assets import report_rollout_change, rollout_changed, served_base_url
from qe_assets.rollout.registry import active_test, start_test, sync_state_file
from qe_assets.service.rollout import state_path
from qe_assets.settings import Settings
from qe_assets.store import transaction
from qe_assets.store.evaluations import (
    GATE,
    Candidate,
    cached_answers,
    evaluation_items,
    evaluation_of_run,
    flagged_reason,
    icl_examples,
    latest_candidate,
    production_model,
    record_promotion,
    save_evaluation,
)


@dataclass(frozen=True)
class Plan:
    """What this run compares, or why it compares nothing (`skip`)."""

    candidate: Candidate | None = None
    baseline: str | None = None
    items: pl.DataFrame | None = None
    judge: str | None = None
    skip: str | None = None
    warn: bool = False  # the skip is a configuration gap, not a normal state
    flagged: str | None = None  # `qe forget` flagged the candidate: blocked, never evaluated


def plan_evaluation(
    duckdb: DuckDBResource, settings: Settings, finetune: FineTuneBackendResource, key_set: bool
) -> Plan:
    backend = finetune.name
    with duckdb_writer(duckdb) as conn:
        candidate = latest_candidate(conn, backend)
        production = production_model(conn)
        items = evaluation_items(conn)
        flagged = None if candidate is None else flagged_reason(conn, candidate.model_id)
    if candidate is None:
        why = "trains nothing" if backend == "none" else "has produced no model yet"
        return Plan(skip=f"QE_FINETUNE_BACKEND={backend} {why}: no candidate to evaluate")
    baseline = production or candidate.base_model or finetune.base_model
    if candidate.model_id == production:
        return Plan(skip=f"{candidate.model_id} is already the production model")
    if flagged is not None:
        # Nothing to ask the endpoints or the judge: whatever they said, it is never promoted.
        judge = settings.eval_judge_model or settings.llm_judge_model or settings.llm_model
        return Plan(candidate, baseline, items, judge or "none", flagged=flagged)
    # Not configured: nothing is promoted, and the release that trained the model still ends.
    judge = judge_model(settings)
    if not judge:
        return Plan(skip="no judge model: set QE_EVAL_JUDGE_MODEL (or QE_LLM_MODEL)", warn=True)
    if not key_set:
        return Plan(
            skip="OPENAI_API_KEY is not set (any value for a local server without keys)",
            warn=True,
        )
    return Plan(candidate, baseline, items, judge)


def served(settings: Settings, model: str) -> str:
    """The name the evaluation endpoint serves a model under: QE_EVAL_MODEL_MAP, else the name
    the model server registered it under (`model_rag_qa_vNNN`, serving/resource.py), else its
    id."""
    return settings.eval_model_map.get(model) or served_names(settings.data_dir).get(model, model)


def job_items(items: pl.DataFrame) -> list[dict[str, Any]]:
    systems = load_templates().system
    return [
        {
            **row,
            "system": systems.get(row["language"], systems["en"]),
            "documents": row["documents"] or [],
        }
        for row in items.iter_rows(named=True)
    ]


def commit_items(duckdb: DuckDBResource, eval_id: str, results: list[ItemResult]) -> None:
    """One short transaction per batch: the items judged and the answers paid for."""
    items = item_frame(results)
    cache = cache_frame(results)
    with duckdb_writer(duckdb) as conn:
        conn.register("eval_item_rows", items)
        conn.register("eval_cache_rows", cache)
        columns, cache_columns = ", ".join(ITEM_COLUMNS), ", ".join(CACHE_COLUMNS)
        with transaction(conn):
            conn.execute(
                f"INSERT OR REPLACE INTO evaluation_items (evaluation_id, {columns}) "
                f"SELECT ?, {columns} FROM eval_item_rows",
                [eval_id],
            )
            conn.execute(
                f"INSERT INTO llm_cache ({cache_columns}, created_at) "
                f"SELECT {cache_columns}, now()::TIMESTAMP FROM eval_cache_rows "
                "ON CONFLICT DO NOTHING"
            )


def _row(
    eval_id: str,
    plan: Plan,
    pairing: Pairing,
    frame: pl.DataFrame,
    settings: Settings,
    results: list[ItemResult],
    run_id: str,
) -> tuple[dict[str, Any], dict[str, Tally]]:
    overall, labels, decision = summarize(
        frame,
        min_items=settings.eval_min_items,
        margin=settings.eval_margin,
        max_failed_share=settings.eval_max_failed_share,
    )
    cost = spend(results, settings.llm_price_input_per_1m, settings.llm_price_output_per_1m)
    assert plan.candidate is not None and plan.baseline is not None
    row = {
        "evaluation_id": eval_id,
        "candidate": plan.candidate.model_id,
        "baseline": pairing.baseline,
        "dataset_version": plan.candidate.dataset_version,
        **{k: getattr(overall, k) for k in ("n", "wins", "ties", "losses", "failed")},
        "win_rate": overall.win_rate,
        "ci_low": overall.ci_low,
        "decision": decision.decision,
        "reason": decision.reason,
        "retry": decision.retry,
        "judge_model": pairing.judge_model,
        "per_label": per_label_json(labels),
        "prompt_tokens": cost["prompt_tokens"],
        "completion_tokens": cost["completion_tokens"],
        "estimated_cost": cost["estimated_cost"],
        "dagster_run_id": run_id,
    }
    return row, labels


def _metadata(compared: "Compared", items: pl.DataFrame) -> "dict[str, dg.RawMetadataValue]":
    row, labels, frame = compared.row, compared.labels, compared.frame
    results, elapsed = compared.results, compared.elapsed
    prompts = dict(zip(items["sample_id"], items["question"], strict=True))
    calls = spend(results, 0.0, 0.0)
    metadata: dict[str, dg.RawMetadataValue] = {
        key: row[key]
        for key in (
            "evaluation_id",
            "candidate",
            "baseline",
            "dataset_version",
            "judge_model",
            "n",
            "wins",
            "ties",
            "losses",
            "failed",
            "decision",
            "reason",
            "estimated_cost",
            "prompt_tokens",
            "completion_tokens",
        )
    }
    metadata.update(
        win_rate=round(row["win_rate"], 4),
        ci_low=round(row["ci_low"], 4),
        win_rate_with_bound=dg.MetadataValue.md(
            f"**{row['win_rate']:.3f}** (95 % lower bound {row['ci_low']:.3f}) over "
            f"{row['n']} judged pairs, {row['failed']} failed"
        ),
        per_label=dg.MetadataValue.md(label_table(labels)),
        examples=dg.MetadataValue.md(examples_markdown(frame, prompts)),
        calls=calls["calls"],
        judge_calls=calls["judge_calls"],
        elapsed_s=round(elapsed, 3),
        items_per_s=round(frame.height / elapsed, 1) if elapsed else 0.0,
    )
    metadata["dagster/row_count"] = frame.height
    for error, count in error_counts(frame).items():
        metadata[f"error/{error}"] = count
    return metadata


@dataclass(frozen=True)
class Gated:
    """One run of the gate: the comparison with production and what it did."""

    compared: "Compared"
    promoted: bool
    canary: bool
    icl: dict[str, Any] | None
    # The rollout change to report to Dagster as an `ab_test` materialization (no run).
    rollout_event: dg.AssetMaterialization | None = None


def evaluate_candidate(
    log: dg.DagsterLogManager | Any,
    run_id: str,
    duckdb: DuckDBResource,
    settings: Settings,
    finetune: FineTuneBackendResource,
    openai: OpenAIResource,
    model_server: ModelServerResource | None = None,
) -> tuple[Plan, Gated | None]:
    """The gate, Dagster or not (the crash trials run it directly): plan, probe a model served
    here, compare with production, commit the decision and its promotion in one transaction,
    then the ICL row."""
    plan = plan_evaluation(duckdb, settings, finetune, openai.configured)
    if plan.skip is not None:
        (log.warning if plan.warn else log.info)(f"nothing to evaluate: {plan.skip}")
        return plan, None
    assert plan.candidate and plan.baseline and plan.items is not None and plan.judge
    if plan.flagged is not None:
        return plan, block_flagged(log, run_id, duckdb, settings, plan)
    if plan.items.is_empty():
        log.warning(
            "the evaluation set is empty (QE_EVAL_SHARE holds nothing out yet): recorded as "
            "insufficient_data, nothing promoted"
        )
    pairing = Pairing(
        candidate=plan.candidate.model_id,
        baseline=plan.baseline,
        candidate_served=served(settings, plan.candidate.model_id),
        baseline_served=served(settings, plan.baseline),
        judge_model=plan.judge,
        max_tokens=settings.llm_max_tokens,
        concurrency=settings.llm_concurrency,
        batch_size=settings.llm_batch_size,
        local_judge=local_judge(settings),
    )
    candidate = plan.candidate.model_id
    # The model server runs (a `transformers` one is started here) for the comparisons only.
    serving = model_server.serving() if model_server is not None else nullcontext(None)
    with serving as served_url:
        endpoint = models_endpoint(openai, settings, served_url)
        if model_server is not None:
            _parity(log, duckdb, settings, model_server, plan, pairing, endpoint)
        compared = _compare(
            log, run_id, duckdb, settings, openai, plan, pairing, "production", endpoint
        )
        with duckdb_writer(duckdb) as conn:
            promoted, canary = commit_decision(conn, compared.row, settings, run_id)
            change = (
                f"canary {candidate} started at {settings.ab_ramp[0]:.0%} of traffic"
                if canary
                else f"{candidate} promoted to production"
                if promoted
                else None
            )
            # ab_test's page says what rollout.json says now, not at its last ingest run.
            event = rollout_changed(conn, settings, GATE, change) if change else None
        icl = _icl_row(log, run_id, duckdb, settings, openai, plan, pairing, endpoint)
    if promoted:
        log.info(f"{candidate} promoted to production by the gate")
    elif canary:
        log.info(
            f"{candidate} passed the gate: canary at {settings.ab_ramp[0]:.0%} of "
            "traffic (QE_ROLLOUT=canary); ab_test decides its promotion"
        )
    if icl is not None:
        with duckdb_writer(duckdb) as conn:
            save_evaluation(conn, icl)
    return plan, Gated(compared, promoted, canary, icl, event)


def block_flagged(
    log: dg.DagsterLogManager | Any,
    run_id: str,
    duckdb: DuckDBResource,
    settings: Settings,
    plan: Plan,
) -> Gated:
    """The decision on a candidate `qe forget` flagged, without evaluating it: `block`, the
    flag as its reason, nothing promoted, no traffic. A decision, not an error: the release ends
    (gate_pending never resumes it) and the timeline says why."""
    assert plan.candidate is not None and plan.baseline is not None and plan.flagged
    model = plan.candidate.model_id
    eval_id = evaluation_id(model, plan.baseline, "flagged", [])
    row: dict[str, Any] = {
        "evaluation_id": eval_id,
        "candidate": model,
        "baseline": plan.baseline,
        "dataset_version": plan.candidate.dataset_version,
        **dict.fromkeys(("n", "wins", "ties", "losses", "failed"), 0),
        "win_rate": 0.0,
        "ci_low": 0.0,
        "decision": BLOCK,
        "reason": plan.flagged,
        "retry": False,
        "judge_model": plan.judge or "none",
        "per_label": per_label_json({}),
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "estimated_cost": 0.0,
        "dagster_run_id": run_id,
        "comparison": "production",
    }
    with duckdb_writer(duckdb) as conn:
        commit_decision(conn, row, settings, run_id)
    log.warning(f"{model} not evaluated: {plan.flagged}; blocked, nothing promoted, no traffic")
    compared = Compared(eval_id, row, {}, item_frame([]), [], 0.0)
    return Gated(compared, promoted=False, canary=False, icl=None)


def commit_decision(
    conn: duckdb.DuckDBPyConnection, row: dict[str, Any], settings: Settings, run_id: str
) -> tuple[bool, bool]:
    """(promoted, canary): the evaluation row and what its decision does, in one transaction,
    so a kill leaves either neither or both (issue #26: a `promote` row without its promotion
    stranded the model). A candidate `qe forget` flagged meanwhile (during its evaluation) is
    recorded `block` with the flag as its reason: `row` is updated, so the caller reports what
    was committed, and nothing raises. Then rollout.json from the tables."""
    with transaction(conn):
        flagged = flagged_reason(conn, row["candidate"])
        if flagged is not None:
            row.update(decision=BLOCK, reason=flagged, retry=False)
        save_evaluation(conn, row)
        passed = row["decision"] == PROMOTE and production_model(conn) != row["candidate"]
        canary = passed and settings.rollout_mode == "canary"
        if canary:
            # Traffic first, production later: the A/B test (ab_test) decides.
            share = settings.ab_ramp[0]
            start_test(
                conn,
                row["candidate"],
                row["baseline"],
                share,
                GATE,
                f"passed the gate ({row['reason']}); canary at {share:.0%}",
                run_id=run_id,
            )
        elif passed:
            record_promotion(
                conn,
                row["candidate"],
                GATE,
                evaluation_id=row["evaluation_id"],
                reason=row["reason"],
            )
    sync_state_file(conn, state_path(settings), served_base_url(settings))
    return passed and not canary, canary


@dg.asset(
    deps=[fine_tuned_model],
    group_name="release",
    kinds={"openai", "duckdb"},
    output_required=False,
    description=(
        "The newest fine-tuned model against production (the promoted model, else the base "
        "model) on the frozen evaluation set: both answer every held-out prompt through an "
        "OpenAI-compatible endpoint (QE_EVAL_BASE_URL, QE_EVAL_MODEL_MAP), a judge compares "
        "each pair in randomised order, and the win rate, its 95 % Wilson lower bound and a "
        "per-label table land in `model_evaluations` / `evaluation_items`. A candidate that "
        "answers nothing usable loses the item; judge and endpoint failures are left out, up "
        "to QE_EVAL_MAX_FAILED_SHARE. The decision and its promotion (or canary) are committed "
        "together. Calls are cached by request hash, so a re-run makes none. A candidate `qe "
        "forget` flagged is not evaluated: recorded `block` (flagged by qe forget), nothing "
        "promoted. Materializes nothing when no model was trained."
    ),
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    settings: PipelineSettings,
    finetune: FineTuneBackendResource,
    openai: OpenAIResource,
    model_server: ModelServerResource,
) -> Iterator[dg.MaterializeResult]:
    plan, gated = evaluate_candidate(
        context.log, context.run.run_id, duckdb, settings, finetune, openai, model_server
    )
    if gated is None:
        return
    assert plan.items is not None
    if gated.rollout_event is not None:
        problem = report_rollout_change(context.instance, gated.rollout_event)
        if problem:
            context.log.warning(problem)
    metadata = _metadata(gated.compared, plan.items)
    metadata["promoted"] = gated.promoted
    metadata.update(gate_outcome_metadata(duckdb, gated, settings))
    metadata["dashboards"] = dg.MetadataValue.url(dashboard_url(settings, "evaluations"))
    if gated.icl is not None:
        row = gated.icl
        for key in ("baseline", "evaluation_id", "n", "failed", "win_rate", "ci_low"):
            metadata[f"icl/{key}"] = round(row[key], 4) if isinstance(row[key], float) else row[key]
    yield dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(gated.compared.eval_id)
    )


def _parity(
    log: dg.DagsterLogManager | Any,
    duckdb: DuckDBResource,
    settings: Settings,
    model_server: ModelServerResource,
    plan: Plan,
    pairing: Pairing,
    endpoint: OpenAIResource,
) -> None:
    """The train/serve parity probe (evaluation/parity.py) for a model served here: a failed
    probe fails the evaluation with its one-line reason, before anything is judged."""
    assert plan.candidate is not None
    if not model_server.configured or plan.candidate.model_id.startswith("ft:"):
        return
    # Against the base model the adapter was trained on, not production: a v002 trained on from
    # the promoted v001 may rightly answer as v001 does, and is judged against it afterwards.
    base = plan.candidate.base_model
    result = probe(
        lambda: duckdb_reader(duckdb),
        endpoint.async_client,
        plan.candidate.model_id,
        pairing.candidate_served,
        served(settings, base) if base else pairing.baseline_served,
        set(load_templates().system.values()),
    )
    if not result.ok:
        raise dg.Failure(result.reason)
    log.info(result.reason)


def _icl_row(
    log: dg.DagsterLogManager | Any,
    run_id: str,
    duckdb: DuckDBResource,
    settings: Settings,
    openai: OpenAIResource,
    plan: Plan,
    pairing: Pairing,
    endpoint: OpenAIResource,
) -> dict[str, Any] | None:
    """The optional ICL comparison (QE_EVAL_ICL_EXAMPLES), reported beside the gate."""
    if not settings.eval_icl_examples:
        return None
    assert plan.candidate is not None
    with duckdb_writer(duckdb) as conn:
        shots = icl_examples(conn, plan.candidate.dataset_version, settings.eval_icl_examples)
    icl = replace(
        pairing,
        baseline=f"{plan.baseline}+icl{len(shots) // 2}",
        baseline_shots=tuple(shots),
    )
    return _compare(log, run_id, duckdb, settings, openai, plan, icl, "icl", endpoint).row


@dataclass(frozen=True)
class Compared:
    eval_id: str
    row: dict[str, Any]
    labels: dict[str, Tally]
    frame: pl.DataFrame
    results: list[ItemResult]
    elapsed: float


def _compare(
    log: dg.DagsterLogManager | Any,
    run_id: str,
    duckdb: DuckDBResource,
    settings: Settings,
    openai: OpenAIResource,
    plan: Plan,
    pairing: Pairing,
    comparison: str,
    endpoint: OpenAIResource,
) -> Compared:
    """One comparison over the whole set: answers, verdicts, items committed as they come, and
    the evaluation's row (committed by the caller)."""
    assert plan.items is not None
    items = plan.items
    eval_id = evaluation_id(
        pairing.candidate, pairing.baseline, pairing.judge_model, items["sample_id"].to_list()
    )
    log.info(
        f"evaluating {pairing.candidate} against {pairing.baseline} on {items.height} held-out "
        f"prompts (judge {pairing.judge_model}, concurrency {pairing.concurrency})"
    )
    with duckdb_writer(duckdb) as conn:
        cache = cached_answers(
            conn, [pairing.candidate_served, pairing.baseline_served, pairing.judge_model]
        )
    started = time.monotonic()
    results = (
        evaluate_pairs(
            endpoint.async_client,
            pairing,
            job_items(items),
            cache,
            lambda batch: commit_items(duckdb, eval_id, batch),
            judge_endpoint(openai, settings).async_client,
        )
        if items.height
        else []
    )
    elapsed = time.monotonic() - started
    frame = item_frame(results)
    row, labels = _row(eval_id, plan, pairing, frame, settings, results, run_id)
    row["comparison"] = comparison
    log.info(f"evaluation {eval_id} ({comparison}): {row['decision']} ({row['reason']})")
    return Compared(eval_id, row, labels, frame, results, elapsed)


def gate_outcome(
    decision: str, candidate: str, *, canary_share: float | None = None, promoted: bool = False
) -> str:
    """What the gate's verdict did, in words, for every surface that tells it (the asset's
    metadata, the check, `qe status`): the stored decision `promote` means "passed the gate",
    which with QE_ROLLOUT=canary starts a canary and promotes nothing yet."""
    if decision != PROMOTE:
        return f"not passed ({decision}); nothing promoted, no traffic"
    if canary_share is not None:
        return f"passed the gate; canary started at {canary_share:.0%} of traffic (ab_test decides)"
    if promoted:
        return "passed the gate; promoted to production"
    return f"passed the gate; {candidate} is production already"


def gate_outcome_metadata(
    duckdb: DuckDBResource, gated: Gated, settings: Settings
) -> "dict[str, dg.RawMetadataValue]":
    """The verdict as a person reads it, what it did, and the release timeline so far."""
    row = gated.compared.row
    outcome = gate_outcome(
        row["decision"],
        row["candidate"],
        canary_share=settings.ab_ramp[0] if gated.canary else None,
        promoted=gated.promoted,
    )
    with duckdb_reader(duckdb) as conn:  # reads only: no writer lock
        steps = timeline.release_timeline(timeline.read_rows(conn)) if conn is not None else []
    return {
        "decision": "passed" if row["decision"] == PROMOTE else row["decision"],
        "outcome": outcome,
        "release_timeline": dg.MetadataValue.md(timeline.markdown(steps)),
    }


@dg.asset_check(
    asset=model_evaluation,
    blocking=True,
    description=(
        "Reports the gate's decision on this run's evaluation: passes when the candidate's 95 % "
        "lower bound of its win rate against production is above 0.5 + QE_EVAL_MARGIN, with at "
        "least QE_EVAL_MIN_ITEMS judged pairs, failed items within QE_EVAL_MAX_FAILED_SHARE, "
        "and no label with 20 or more pairs below a win rate of 0.4. `model_evaluation` "
        "committed that decision together with its promotion in `promoted_models` (by `gate`) "
        "or, with QE_ROLLOUT=canary, the A/B test's start at the first QE_AB_RAMP share."
    ),
)
def candidate_beats_production(
    context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.AssetCheckResult:
    with duckdb_reader(duckdb) as conn:  # reads only: the asset committed everything
        row = None if conn is None else evaluation_of_run(conn, context.run.run_id)
        production = None if conn is None else production_model(conn)
        test = None if conn is None else active_test(conn)
        flagged = None if conn is None or row is None else flagged_reason(conn, row["candidate"])
        steps = [] if conn is None else timeline.release_timeline(timeline.read_rows(conn))
    if row is None:
        return dg.AssetCheckResult(
            passed=True, description="nothing was evaluated in this run; nothing promoted"
        )
    decision = Decision(row["decision"], row["reason"], bool(row.get("retry")))
    canary = test is not None and test.candidate == row["candidate"]
    # A worse candidate fails the release run (red, someone should look); too few pairs, or too
    # many failed ones, is a warning: nothing is promoted, and a hold-out set still filling up
    # (or a judge outage, evaluated again by the next run) is not the candidate's failure; nor
    # is a candidate `qe forget` flagged (blocked as asked, not worse).
    severity = (
        dg.AssetCheckSeverity.WARN
        if decision.decision == INSUFFICIENT or (flagged is not None and not decision.passed)
        else dg.AssetCheckSeverity.ERROR
    )
    # Say what was done, not only the rule's verdict.
    promoted = decision.passed and production == row["candidate"] and not canary
    done = gate_outcome(
        row["decision"],
        row["candidate"],
        canary_share=test.share if canary and test is not None else None,
        promoted=promoted,
    )
    return dg.AssetCheckResult(
        passed=decision.passed,
        severity=severity,
        description=f"{done}: {decision.reason}",
        metadata={
            "evaluation_id": row["evaluation_id"],
            "candidate": row["candidate"],
            "baseline": row["baseline"],
            "decision": "passed" if decision.passed else decision.decision,
            "outcome": done,
            "ci_low": round(row["ci_low"], 4),
            "promoted": promoted,
            "canary_share": test.share if canary and test is not None else 0.0,
            "retry": decision.retry,
            "flagged": flagged is not None,
            "release_timeline": dg.MetadataValue.md(timeline.markdown(steps)),
        },
    )
