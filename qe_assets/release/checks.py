"""Asset checks on the version a release publishes (the oldest without a finished fine-tune run,
else the newest): format (blocking), leakage (blocking), label distribution and drift
(warnings)."""

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from qe_assets.ingest.validation import (
    LabelBounds,
    label_share_problems,
    label_shares,
    total_variation,
)
from qe_assets.lib.resources import (
    FineTuneBackendConfig,
    PipelineSettings,
    duckdb_reader,
    duckdb_writer,
)
from qe_assets.release.assets import tuning_dataset
from qe_assets.release.export import (
    VersionFiles,
    format_stamps,
    preference_format_problems,
    version_format_problems,
)
from qe_assets.store.finetune_runs import pending_version, reject_version


@dataclass(frozen=True)
class LatestVersion:
    version: str
    files: VersionFiles
    label_counts: dict[str, int]
    previous_label_counts: dict[str, int] | None


def latest_version(conn: duckdb.DuckDBPyConnection, backend: str) -> LatestVersion | None:
    """The version under check: the one `tuning_dataset` publishes and `fine_tuned_model` takes
    (the oldest without a finished run for the backend), else the newest; with the one before."""
    rows = conn.execute(
        "SELECT version, jsonl_path, chat_path, manifest_path, label_counts FROM dataset_versions "
        "WHERE number <= coalesce((SELECT number FROM dataset_versions WHERE version = ?), "
        "(SELECT max(number) FROM dataset_versions)) ORDER BY number DESC LIMIT 2",
        [pending_version(conn, backend)],
    ).fetchall()
    if not rows:
        return None
    version, jsonl, chat, manifest, counts = rows[0]
    previous = json.loads(rows[1][4]) if len(rows) > 1 else None
    files = VersionFiles(Path(jsonl), Path(chat), Path(manifest))
    return LatestVersion(version, files, json.loads(counts), previous)


def _checked_version(
    duckdb: DuckDBResource, finetune: FineTuneBackendConfig
) -> LatestVersion | None:
    """The version under check, read with a short read-only connection."""
    with duckdb_reader(duckdb) as conn:
        return None if conn is None else latest_version(conn, finetune.name)


def _refuse(
    duckdb: DuckDBResource,
    finetune: FineTuneBackendConfig,
    name: str,
    result: dg.AssetCheckResult,
) -> dg.AssetCheckResult:
    """A failed blocking check refuses its version for good (a `rejected` fine_tune_runs row):
    the files are immutable, so publishing it again would fail again and hold back every newer
    version."""
    if not result.passed:
        version = str(result.metadata["version"].value)
        with duckdb_writer(duckdb) as conn:
            reason = f"{name}: {result.description}"[:2000]
            reject_version(conn, version, finetune.name, reason)
    return result


def _no_version() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True, metadata={"version": "none yet"})


def _result(
    version: str, problems: list[str], severity: dg.AssetCheckSeverity, **extra: object
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not problems,
        severity=severity,
        description="; ".join(problems) if problems else None,
        metadata={"version": version, "problems": len(problems), **extra},
    )


@dg.asset_check(
    asset=tuning_dataset,
    blocking=True,
    description=(
        "Blocking: every line of the chat file follows the OpenAI chat fine-tuning format, and "
        "the JSONL records have enough examples, no empty prompt or completion, and a "
        "confidence in [0, 1]."
    ),
)
def dataset_format_valid(
    duckdb: DuckDBResource, settings: PipelineSettings, finetune: FineTuneBackendConfig
) -> dg.AssetCheckResult:
    latest = _checked_version(duckdb, finetune)
    if latest is None:
        return _no_version()
    before = format_stamps(latest.files)
    problems, examples = version_format_problems(latest.files, settings.min_dataset_examples)
    # The files' stamps, when nothing wrote them while they were read: fine_tuned_model in the
    # same run then trusts this verdict instead of parsing every line again.
    stamps = before if format_stamps(latest.files) == before else None
    result = _result(
        latest.version,
        problems,
        dg.AssetCheckSeverity.ERROR,
        examples=examples,
        checked_files=dg.MetadataValue.json(stamps or {}),
    )
    return _refuse(duckdb, finetune, "dataset_format_valid", result)


@dg.asset_check(
    asset=tuning_dataset,
    blocking=True,
    description=(
        "Blocking: every preference pair follows its provider's format: TRL's conversational "
        "preference format (`prompt` messages ending with a user message, `chosen` and "
        "`rejected` one assistant message each) in the version's preference files, OpenAI's "
        "preference fine-tuning format (`input.messages`, `preferred_output`, "
        "`non_preferred_output`) in its per-split OpenAI files; chosen differs from rejected; "
        "the pair count matches the manifest."
    ),
)
def preference_format_valid(
    duckdb: DuckDBResource, finetune: FineTuneBackendConfig
) -> dg.AssetCheckResult:
    latest = _checked_version(duckdb, finetune)
    if latest is None:
        return _no_version()
    manifest = json.loads(latest.files.manifest.read_text("utf-8"))
    problems, pairs = preference_format_problems(latest.files, manifest)
    expected = (manifest.get("preference") or {}).get("pairs", 0)
    if pairs != expected:
        problems.append(f"{pairs} preference pairs on disk, the manifest says {expected}")
    result = _result(latest.version, problems, dg.AssetCheckSeverity.ERROR, pairs=pairs)
    return _refuse(duckdb, finetune, "preference_format_valid", result)


@dg.asset_check(
    asset=tuning_dataset,
    blocking=True,
    description=(
        "Blocking: no sample of the version is in another version, and no question "
        "is on the train side in one place and the validation side in another."
    ),
)
def dataset_no_leakage(
    duckdb: DuckDBResource, finetune: FineTuneBackendConfig
) -> dg.AssetCheckResult:
    with duckdb_reader(duckdb) as conn:
        latest = None if conn is None else latest_version(conn, finetune.name)
        if conn is None or latest is None:
            return _no_version()
        ((repeated,),) = conn.execute(
            """
            SELECT count(*) FROM dataset_samples a JOIN dataset_samples b USING (sample_id)
            WHERE a.version = ? AND b.version <> ?
              -- a version `qe forget` superseded shares its samples with its replacement
              AND b.version NOT IN (SELECT version FROM version_supersessions)
            """,
            [latest.version, latest.version],
        ).fetchall()
        ((crossing,),) = conn.execute(
            """
            WITH mine AS (
                SELECT DISTINCT s.question_key FROM dataset_samples d
                JOIN annotated_samples s USING (sample_id) WHERE d.version = ?
            )
            SELECT count(*) FROM (
                SELECT s.question_key FROM dataset_samples d
                JOIN annotated_samples s USING (sample_id)
                SEMI JOIN mine USING (question_key)
                GROUP BY 1 HAVING count(DISTINCT d.split) > 1
            )
            """,
            [latest.version],
        ).fetchall()
    problems = []
    if repeated:
        problems.append(f"{repeated} samples are already in an earlier version")
    if crossing:
        problems.append(f"{crossing} questions appear in both train and validation")
    result = _result(
        latest.version,
        problems,
        dg.AssetCheckSeverity.ERROR,
        samples_in_other_versions=int(repeated),
        questions_in_both_splits=int(crossing),
    )
    return _refuse(duckdb, finetune, "dataset_no_leakage", result)


@dg.asset_check(
    asset=tuning_dataset,
    description=(
        "Label distribution of the checked version within bounds: no label above "
        "QE_MAX_LABEL_SHARE, `unspecified` at most QE_MAX_UNSPECIFIED_SHARE, labels outside the "
        "known four at most QE_MAX_UNKNOWN_LABEL_SHARE. A warning: the data is valid, but the "
        "evaluator or the traffic may have changed."
    ),
)
def label_distribution(
    duckdb: DuckDBResource, settings: PipelineSettings, finetune: FineTuneBackendConfig
) -> dg.AssetCheckResult:
    latest = _checked_version(duckdb, finetune)
    if latest is None:
        return _no_version()
    bounds = LabelBounds(
        settings.max_label_share, settings.max_unspecified_share, settings.max_unknown_label_share
    )
    shares = {k: round(v, 4) for k, v in label_shares(latest.label_counts).items()}
    return _result(
        latest.version,
        label_share_problems(latest.label_counts, bounds),
        dg.AssetCheckSeverity.WARN,
        label_shares=dg.MetadataValue.json(shares),
    )


@dg.asset_check(
    asset=tuning_dataset,
    description=(
        "Label drift against the previous version: total variation distance of the label "
        "shares at most QE_MAX_LABEL_DRIFT (a warning)."
    ),
)
def label_drift(
    duckdb: DuckDBResource, settings: PipelineSettings, finetune: FineTuneBackendConfig
) -> dg.AssetCheckResult:
    latest = _checked_version(duckdb, finetune)
    if latest is None:
        return _no_version()
    if latest.previous_label_counts is None:
        return dg.AssetCheckResult(
            passed=True, metadata={"version": latest.version, "previous": "none"}
        )
    distance = total_variation(latest.previous_label_counts, latest.label_counts)
    problems = (
        [f"label shares moved by {distance:.3f} (bound {settings.max_label_drift})"]
        if distance > settings.max_label_drift
        else []
    )
    return _result(
        latest.version,
        problems,
        dg.AssetCheckSeverity.WARN,
        total_variation_distance=round(distance, 4),
    )


DATASET_CHECKS = [
    dataset_format_valid,
    preference_format_valid,
    dataset_no_leakage,
    label_distribution,
    label_drift,
]
