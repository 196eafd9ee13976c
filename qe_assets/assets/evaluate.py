"""Stage 6, the evaluation gate: the newest fine-tuned model against production on the frozen
evaluation set, judged pairwise; the blocking check promotes it only when it measurably wins."""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource

from qe_assets.assets.finetune import fine_tuned_model
from qe_assets.evaluation.endpoints import (
    judge_endpoint,
    judge_model,
    local_judge,
    models_endpoint,
)
from qe_assets.evaluation.engine import ItemResult, Pairing, evaluate_pairs
from qe_assets.evaluation.metrics import INSUFFICIENT, Decision, Tally, decide, label_table
from qe_assets.evaluation.parity import probe
from qe_assets.evaluation.registry import (
    GATE,
    Candidate,
    cached_answers,
    evaluation_items,
    evaluation_of_run,
    icl_examples,
    latest_candidate,
    production_model,
    record_promotion,
    save_evaluation,
)
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
from qe_assets.evaluation.rollout_registry import start_test, sync_state_file
from qe_assets.resources import (
    FineTuneBackendResource,
    OpenAIResource,
    PipelineSettings,
    duckdb_reader,
    duckdb_writer,
)
from qe_assets.rollout import state_path
from qe_assets.serving.resource import ModelServerResource, served_names
from qe_assets.settings import Settings
from qe_assets.store import transaction
from qe_assets.templates import load_templates
from qe_assets.web.links import dashboard_url


@dataclass(frozen=True)
class Plan:
    """What this run compares, or why it compares nothing (`skip`)."""

    candidate: Candidate | None = None
    baseline: str | None = None
    items: pl.DataFrame | None = None
    judge: str | None = None
    skip: str | None = None
    warn: bool = False  # the skip is a configuration gap, not a normal state


def plan_evaluation(
    duckdb: DuckDBResource, settings: Settings, finetune: FineTuneBackendResource, key_set: bool
) -> Plan:
    backend = finetune.name
    with duckdb_writer(duckdb) as conn:
        candidate = latest_candidate(conn, backend)
        production = production_model(conn)
        items = evaluation_items(conn)
    if candidate is None:
        why = "trains nothing" if backend == "none" else "has produced no model yet"
        return Plan(skip=f"QE_FINETUNE_BACKEND={backend} {why}: no candidate to evaluate")
    baseline = production or candidate.base_model or finetune.base_model
    if candidate.model_id == production:
        return Plan(skip=f"{candidate.model_id} is already the production model")
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
        frame, min_items=settings.eval_min_items, margin=settings.eval_margin
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
        "per-label table land in `model_evaluations` / `evaluation_items`. Calls are cached by "
        "request hash, so a re-run makes none. Materializes nothing when no model was trained."
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
    plan = plan_evaluation(duckdb, settings, finetune, openai.configured)
    if plan.skip is not None:
        (context.log.warning if plan.warn else context.log.info)(
            f"nothing to evaluate: {plan.skip}"
        )
        return
    assert plan.candidate and plan.baseline and plan.items is not None and plan.judge
    if plan.items.is_empty():
        context.log.warning(
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
    # The model server runs (a `transformers` one is started here) for the comparisons only.
    with model_server.serving() as served_url:
        endpoint = models_endpoint(openai, settings, served_url)
        _parity(context, duckdb, model_server, plan, pairing, endpoint)
        compared = _compare(
            context, duckdb, settings, openai, plan, pairing, "production", endpoint
        )
        icl_row = _icl_row(context, duckdb, settings, openai, plan, pairing, endpoint)
    metadata = _metadata(compared, plan.items)
    metadata["dashboards"] = dg.MetadataValue.url(dashboard_url(settings, "evaluations"))
    if icl_row is not None:
        for key in ("baseline", "evaluation_id", "n", "failed", "win_rate", "ci_low"):
            value = icl_row[key]
            metadata[f"icl/{key}"] = round(value, 4) if isinstance(value, float) else value
    yield dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(compared.eval_id))


def _parity(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
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
    result = probe(
        lambda: duckdb_reader(duckdb),
        endpoint.async_client,
        plan.candidate.model_id,
        pairing.candidate_served,
        pairing.baseline_served,
        set(load_templates().system.values()),
    )
    if not result.ok:
        raise dg.Failure(result.reason)
    context.log.info(result.reason)


def _icl_row(
    context: dg.AssetExecutionContext,
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
    return _compare(context, duckdb, settings, openai, plan, icl, "icl", endpoint).row


@dataclass(frozen=True)
class Compared:
    eval_id: str
    row: dict[str, Any]
    labels: dict[str, Tally]
    frame: pl.DataFrame
    results: list[ItemResult]
    elapsed: float


def _compare(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    settings: Settings,
    openai: OpenAIResource,
    plan: Plan,
    pairing: Pairing,
    comparison: str,
    endpoint: OpenAIResource,
) -> Compared:
    """One comparison over the whole set: answers, verdicts, items committed as they come, the
    evaluation row saved."""
    assert plan.items is not None
    items = plan.items
    eval_id = evaluation_id(
        pairing.candidate, pairing.baseline, pairing.judge_model, items["sample_id"].to_list()
    )
    context.log.info(
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
    row, labels = _row(eval_id, plan, pairing, frame, settings, results, context.run.run_id)
    row["comparison"] = comparison
    with duckdb_writer(duckdb) as conn:
        save_evaluation(conn, row)
    context.log.info(f"evaluation {eval_id} ({comparison}): {row['decision']} ({row['reason']})")
    return Compared(eval_id, row, labels, frame, results, elapsed)


def gate_decision(row: dict[str, Any], settings: Settings) -> Decision:
    """The gate's rule applied to a stored evaluation with the settings in effect."""
    overall = Tally(row["n"], row["wins"], row["ties"], row["losses"], row["failed"])
    labels = {
        label: Tally(t["n"], t["wins"], t["ties"], t["losses"], t["failed"])
        for label, t in json.loads(row["per_label"]).items()
    }
    return decide(overall, labels, min_items=settings.eval_min_items, margin=settings.eval_margin)


@dg.asset_check(
    asset=model_evaluation,
    blocking=True,
    description=(
        "Passes when the candidate's 95 % lower bound of its win rate against production is "
        "above 0.5 + QE_EVAL_MARGIN, with at least QE_EVAL_MIN_ITEMS judged pairs, and no label "
        "with 20 or more pairs falls below a win rate of 0.4; only then is the candidate "
        "recorded as the production model in `promoted_models` (by `gate`); with "
        "QE_ROLLOUT=canary it becomes the A/B test's candidate at the first QE_AB_RAMP share "
        "instead, and `ab_test` decides."
    ),
)
def candidate_beats_production(
    context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> dg.AssetCheckResult:
    with duckdb_writer(duckdb) as conn:
        row = evaluation_of_run(conn, context.run.run_id)
        if row is None:
            return dg.AssetCheckResult(
                passed=True, description="nothing was evaluated in this run; nothing promoted"
            )
        decision = gate_decision(row, settings)
        passed = decision.passed and production_model(conn) != row["candidate"]
        canary = passed and settings.rollout_mode == "canary"
        promoted = passed and not canary
        if canary:
            # Traffic first, production later: the A/B test (ab_test) decides.
            share = settings.ab_ramp[0]
            start_test(
                conn,
                row["candidate"],
                row["baseline"],
                share,
                GATE,
                f"passed the gate ({decision.reason}); canary at {share:.0%}",
                run_id=context.run.run_id,
            )
        elif promoted:
            record_promotion(
                conn,
                row["candidate"],
                GATE,
                evaluation_id=row["evaluation_id"],
                reason=decision.reason,
            )
        sync_state_file(conn, state_path(settings))
    if promoted:
        context.log.info(f"{row['candidate']} promoted to production by the gate")
    elif canary:
        context.log.info(
            f"{row['candidate']} passed the gate: canary at {settings.ab_ramp[0]:.0%} of traffic "
            "(QE_ROLLOUT=canary); ab_test decides its promotion"
        )
    # A worse candidate fails the release run (red, someone should look); too few pairs to decide
    # is a warning: nothing is promoted, and a hold-out set still filling up is not a failure.
    severity = (
        dg.AssetCheckSeverity.WARN
        if decision.decision == INSUFFICIENT
        else dg.AssetCheckSeverity.ERROR
    )
    return dg.AssetCheckResult(
        passed=decision.passed,
        severity=severity,
        description=decision.reason,
        metadata={
            "evaluation_id": row["evaluation_id"],
            "candidate": row["candidate"],
            "baseline": row["baseline"],
            "decision": decision.decision,
            "ci_low": round(row["ci_low"], 4),
            "promoted": promoted,
            "canary_share": settings.ab_ramp[0] if canary else 0.0,
        },
    )
