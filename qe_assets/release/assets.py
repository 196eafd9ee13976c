"""Stage 4, export: every completed sample not yet in a version → the next immutable vNNN."""

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource
from pydantic import Field

from qe_assets.annotate.complete import completions
from qe_assets.lib.charts import as_markdown_image, import_in_background, label_share_png
from qe_assets.lib.links import dashboard_url
from qe_assets.lib.pii import redact
from qe_assets.lib.resources import (
    FineTuneBackendConfig,
    PipelineSettings,
    duckdb_writer,
    exclusive_stage,
)
from qe_assets.lib.stages import RELEASE_GROUP
from qe_assets.lib.templates import Templates, load_templates
from qe_assets.release.dataset import (
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    assign_split,
    chat_lines,
    label_counts,
    preference_lines,
    preference_pairs,
    records,
    redact_identifiers,
)
from qe_assets.release.export import (
    VersionFiles,
    VersionWriter,
    dataset_card,
    remove_uncommitted,
    settle_manifests,
    version_name,
)
from qe_assets.release.holdout import hold_out
from qe_assets.release.readiness import (
    READY_IN_WINDOW,
    WINDOW_END,
    VersionState,
    settings_release_decision,
    version_state,
)
from qe_assets.settings import Settings
from qe_assets.store import owned_copy, select_frame, transaction


def _ready_batches(
    duckdb_resource: DuckDBResource, state: VersionState, batch_size: int
) -> Iterator[pl.DataFrame]:
    """Ready samples, a window of completions (by seq) per short-lived connection, each window
    in ingest order."""
    low = state.low
    while low < state.high:
        params = {"low": low, "high": state.high, "limit": batch_size}
        with duckdb_writer(duckdb_resource) as conn:
            batch = select_frame(conn, READY_IN_WINDOW, params)
            ((window_end,),) = conn.execute(WINDOW_END, params).fetchall()
        if window_end is None:
            return
        if not batch.is_empty():
            yield batch
        low = int(window_end)


def _pairs(batch: pl.DataFrame, settings: Settings, redacted: dict[str, int]) -> pl.DataFrame:
    """The batch's trustworthy preference pairs; the rejected answers redacted like the rest."""
    pairs = preference_pairs(batch)
    if settings.pii_redaction and pairs.height:
        pairs, found = redact(pairs, ["original_answer"])
        for kind, count in found.items():
            redacted[kind] = redacted.get(kind, 0) + count
        pairs = preference_pairs(pairs)  # redaction may have made the two answers equal
    return pairs


def _preference_summary(counts: dict[str, int]) -> dict[str, Any]:
    return {
        "pairs": counts.get(TRAIN_SPLIT, 0) + counts.get(VALIDATION_SPLIT, 0),
        TRAIN_SPLIT: counts.get(TRAIN_SPLIT, 0),
        VALIDATION_SPLIT: counts.get(VALIDATION_SPLIT, 0),
        "chosen_from": {mode: counts.get(mode, 0) for mode in ("human", "llm")},
        "rule": "chosen = a human edit or a judge-approved LLM rewrite; rejected = the original "
        "answer; naive completions never form a pair",
        "formats": {
            "preference": "TRL conversational preference (prompt, chosen, rejected)",
            "openai_preference": "OpenAI preference fine-tuning "
            "(input.messages, preferred_output, non_preferred_output)",
        },
    }


def _manifest(
    version: str,
    settings: Settings,
    labels: dict[str, int],
    modes: dict[str, int],
    splits: dict[str, int],
    seq_range: tuple[int, int],
) -> dict[str, Any]:
    total = sum(labels.values())
    return {
        "dataset": "rag_quality_tuning",
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "counts": {
            "samples": total,
            **{k: splits.get(k, 0) for k in (TRAIN_SPLIT, VALIDATION_SPLIT)},
        },
        "label_counts": labels,
        "completion_modes": modes,
        "split": {
            "method": "md5(normalised question) bucket; a question is always on the same side",
            "validation_share": settings.validation_share,
            TRAIN_SPLIT: splits.get(TRAIN_SPLIT, 0),
            VALIDATION_SPLIT: splits.get(VALIDATION_SPLIT, 0),
        },
        "chat_format": {
            "system_message": settings.chat_system_message,
            "weight_threshold": settings.chat_weight_threshold,
        },
        "completion_seq_range": list(seq_range),
        "settings": settings.documented(),
    }


@dataclass
class _Tally:
    """What a cut has written so far: the counts its manifest reports and the samples (under
    their stored ids) and held-out samples its commit records."""

    last_seq: int
    labels: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    redacted: dict[str, int] = field(default_factory=dict)
    pair_counts: dict[str, int] = field(default_factory=dict)
    members: list[pl.DataFrame] = field(default_factory=list)
    held_out: list[pl.DataFrame] = field(default_factory=list)

    def add(self, written: pl.DataFrame, pairs: pl.DataFrame, stored: pl.DataFrame) -> None:
        for column in ("mode", "split"):
            for key, count in pairs.group_by(column).len().iter_rows():
                self.pair_counts[key] = self.pair_counts.get(key, 0) + count
        for name, count in label_counts(written).items():
            self.labels[name] = self.labels.get(name, 0) + count
        for mode, count in written.group_by("mode").len().iter_rows():
            self.modes[mode] = self.modes.get(mode, 0) + count
        self.members.append(stored)

    @property
    def written(self) -> int:
        return sum(m.height for m in self.members)


def _export_batch(
    writer: VersionWriter,
    batch: pl.DataFrame,
    settings: Settings,
    templates: Templates,
    redacted: dict[str, int],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Write a batch's records, chat lines and preference pairs; returns the batch as written
    (redacted) and its pairs."""
    if settings.pii_redaction:
        # Nothing personal leaves the store: prompts and completions are redacted, labels too and
        # ids holding PII become pseudonyms, on the way into the files, manifest and metadata
        # (the tables keep what was received, for audit).
        batch, found = redact(batch, ["prompt", "completion"])
        batch, in_labels = redact_identifiers(batch)
        for kind in found:
            redacted[kind] = redacted.get(kind, 0) + found[kind] + in_labels[kind]
    pairs = _pairs(batch, settings, redacted)
    writer.write(
        records(batch),
        chat_lines(
            batch,
            templates,
            system_message=settings.chat_system_message,
            weight_threshold=settings.chat_weight_threshold,
        ),
        batch["split"],
        preference_lines(
            pairs, templates, system_message=settings.chat_system_message
        ).with_columns(pairs["split"]),
    )
    return batch, pairs


def _write_batches(
    duckdb_resource: DuckDBResource,
    settings: Settings,
    state: VersionState,
    writer: VersionWriter,
    on_batch: Callable[[int], None] | None,
) -> _Tally:
    """Every ready sample into the version's files, a batch at a time; the evaluation set's
    share leaves every file."""
    templates = load_templates()
    tally = _Tally(last_seq=state.low)
    for batch in _ready_batches(duckdb_resource, state, settings.export_batch_size):
        batch_seq = int(batch["completion_seq"].max())  # type: ignore[arg-type]
        batch = assign_split(batch, settings.validation_share, settings.eval_share)
        with duckdb_writer(duckdb_resource) as conn:
            batch, held = hold_out(conn, batch)
        tally.held_out.append(held)
        if not batch.is_empty():
            # The stored ids: dataset_samples keys on them whatever the files show.
            stored = batch.select(owned_copy("sample_id"), "split")
            written, pairs = _export_batch(writer, batch, settings, templates, tally.redacted)
            tally.add(written, pairs, stored)
        tally.last_seq = batch_seq
        if on_batch is not None and not batch.is_empty():
            on_batch(tally.written)
    return tally


def _version_manifest(
    version: str, settings: Settings, state: VersionState, tally: _Tally, splits: dict[str, int]
) -> dict[str, Any]:
    labels = dict(sorted(tally.labels.items(), key=lambda item: (-item[1], item[0])))
    seq_range = (state.low, tally.last_seq)
    manifest = _manifest(version, settings, labels, tally.modes, splits, seq_range)
    manifest["pii_redactions"] = tally.redacted if settings.pii_redaction else None
    manifest["preference"] = _preference_summary(tally.pair_counts)
    return manifest


def _commit_version(
    duckdb_resource: DuckDBResource,
    files: VersionFiles,
    number: int,
    manifest: dict[str, Any],
    samples: pl.DataFrame,
    tally: _Tally,
) -> None:
    """The commit point of a cut, after its files and manifest are in place: the version's row,
    its samples and the held-out samples, in one transaction."""
    splits = manifest["split"]
    with duckdb_writer(duckdb_resource) as conn:
        conn.register("version_samples", samples)
        with transaction(conn):
            conn.execute(
                "INSERT INTO dataset_versions VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
                [
                    manifest["version"],
                    number,
                    str(files.jsonl),
                    str(files.chat),
                    str(files.manifest),
                    samples.height,
                    splits[TRAIN_SPLIT],
                    splits[VALIDATION_SPLIT],
                    manifest["files"]["jsonl"]["sha256"],
                    manifest["files"]["chat"]["sha256"],
                    manifest["files"]["manifest"]["sha256"],
                    json.dumps(manifest["label_counts"], ensure_ascii=False),
                    json.dumps(manifest["settings"], ensure_ascii=False),
                    tally.last_seq,
                ],
            )
            conn.execute(
                "INSERT INTO dataset_samples SELECT ?, sample_id, split FROM version_samples",
                [manifest["version"]],
            )
            conn.register("held_out", pl.concat(tally.held_out))
            conn.execute(
                "INSERT INTO evaluation_set SELECT sample_id, question_key, ?, now()::TIMESTAMP "
                "FROM held_out ON CONFLICT DO NOTHING",
                [manifest["version"]],
            )


def cut_version(
    duckdb_resource: DuckDBResource,
    settings: Settings,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict[str, Any] | None:
    """Write and commit the next version; None when no sample is ready. `on_batch(version,
    samples written so far)` follows progress.

    The number is claimed first (committed), so no other cut ever takes the name. Files next
    (under temp names, renamed into place), the manifest under its temp name, then the row, then
    the manifest's rename: a failed commit removes the files, and a crash before the commit
    leaves files of a claimed number that the next cut removes (export.py)."""
    with duckdb_writer(duckdb_resource) as conn:
        state = version_state(conn)
        _settle(conn, settings)
        _claim(conn, state.next_number)
    version = version_name(state.next_number)
    directory = settings.datasets_dir
    remove_uncommitted(directory, state.committed)
    progress = None if on_batch is None else (lambda written: on_batch(version, written))
    published = False
    try:
        with VersionWriter(directory, version) as writer:
            tally = _write_batches(duckdb_resource, settings, state, writer, progress)
            if not tally.members:
                return None
            samples = pl.concat(tally.members)
            splits = dict(samples.group_by("split").len().iter_rows())
            # From here on files take the version's name: its number stays claimed for good,
            # and a failure removes whatever took the name.
            published = True
            try:
                manifest = writer.publish(
                    _version_manifest(version, settings, state, tally, splits), dataset_card
                )
                _commit_version(
                    duckdb_resource, writer.files, state.next_number, manifest, samples, tally
                )
            except BaseException:
                writer.discard()
                raise
            writer.place_manifest()
    finally:
        if not published:
            # No file took the version's name: the number may go to the next cut after all (a
            # claim left behind by a failing store is only a gap, never worth hiding its error).
            with contextlib.suppress(duckdb.Error), duckdb_writer(duckdb_resource) as conn:
                conn.execute(
                    "DELETE FROM dataset_version_claims WHERE number = ?", [state.next_number]
                )
    return manifest


def _claim(conn: duckdb.DuckDBPyConnection, number: int) -> None:
    conn.execute(
        "INSERT INTO dataset_version_claims VALUES (?, ?, now()::TIMESTAMP)",
        [number, version_name(number)],
    )


def _settle(conn: duckdb.DuckDBPyConnection, settings: Settings) -> list[str]:
    """Manifests of committed versions whose cut died before renaming them (export.py)."""
    committed = dict(
        conn.execute("SELECT version, manifest_sha256 FROM dataset_versions").fetchall()
    )
    return settle_manifests(settings.datasets_dir, committed)


def committed_manifest(settings: Settings, version: str) -> dict[str, Any]:
    """A committed version's manifest, to publish that version again without cutting one."""
    path = VersionFiles.at(settings.datasets_dir, version).manifest
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise dg.Failure(f"dataset {version} is committed but {path} is unreadable: {exc}") from exc


def next_release(
    duckdb_resource: DuckDBResource,
    settings: Settings,
    on_batch: Callable[[str, int], None] | None = None,
    *,
    force: bool = False,
    backend: str | None = None,
) -> tuple[dict[str, Any] | None, bool, str]:
    """(manifest, published again, why) of the version this release is for, by the release rule
    (`readiness.release_decision`, the sensor's and `qe run`'s too): a committed version whose
    release never ended is published again, so its checks and fine-tune run even when the run
    that cut it died right after the commit; else a new cut, only once the ready samples reach
    QE_FINETUNE_THRESHOLD unless `force` (None when nothing is due). `backend`: the fine-tune
    backend whose runs count (the settings' unless the run's `finetune` resource says)."""
    with duckdb_writer(duckdb_resource) as conn:
        _settle(conn, settings)
        decision = settings_release_decision(conn, settings, cut_version=force, backend=backend)
    if decision.due and decision.republish and decision.version is not None:
        return committed_manifest(settings, decision.version), True, decision.reason
    if not decision.due:
        return None, False, decision.reason
    return cut_version(duckdb_resource, settings, on_batch), False, decision.reason


class ReleaseConfig(dg.Config):
    """Run config of `tuning_dataset` (the launchpad shows it)."""

    force: bool = Field(
        default=False,
        description=(
            "Cut a version from every ready sample even below QE_FINETUNE_THRESHOLD (what "
            '`qe run --cut-version` passes). Off: a run that includes this asset ("Materialize '
            'all" too) cuts only when the threshold is reached.'
        ),
    )


@dg.asset(
    deps=[completions],
    group_name=RELEASE_GROUP,
    kinds={"duckdb", "polars", "file"},
    output_required=False,
    description=(
        "The next immutable dataset version `rag_quality_tuning_vNNN`: every completed sample "
        "not yet in a version, as the seed's JSONL record, the OpenAI chat format, preference "
        "pairs (a human edit or judge-approved rewrite against the original answer; TRL and "
        "OpenAI formats) and a manifest (counts, label counts, sha256 per file, split, "
        "settings); the folder `rag_quality_tuning_vNNN/` holds each format per split with a "
        "dataset card for `datasets.load_dataset`. Train/validation split by a "
        "hash of the normalised question. Materializes nothing when no sample is ready. A "
        "committed version with no finished fine-tune run (its run died after the commit) is "
        "published again first, oldest first, so its checks and fine-tune still run."
    ),
)
def tuning_dataset(
    context: dg.AssetExecutionContext,
    config: ReleaseConfig,
    duckdb: DuckDBResource,
    settings: PipelineSettings,
    finetune: FineTuneBackendConfig,
) -> Iterator[dg.MaterializeResult]:
    import_in_background()  # the label chart comes at the end
    with exclusive_stage(context, settings):
        manifest, republished, reason = next_release(
            duckdb,
            settings,
            lambda version, written: context.log.info(f"{version}: {written} samples written"),
            force=config.force,
            backend=finetune.name,
        )
    if manifest is None:
        context.log.info(f"no version cut: {reason}")
        return
    if republished:
        context.log.info(
            f"{manifest['version']} is committed but has no finished "
            f"{finetune.name} fine-tune run: published again, no new version cut"
        )
    total = manifest["counts"]["samples"]
    files = VersionFiles.at(settings.datasets_dir, manifest["version"])
    share_rows = "\n".join(
        f"| {label} | {count} | {count / total:.1%} |"
        for label, count in manifest["label_counts"].items()
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        "version": manifest["version"],
        "samples": total,
        "train": manifest["counts"][TRAIN_SPLIT],
        "validation": manifest["counts"][VALIDATION_SPLIT],
        "jsonl_path": dg.MetadataValue.path(str(files.jsonl)),
        "chat_path": dg.MetadataValue.path(str(files.chat)),
        "manifest_path": dg.MetadataValue.path(str(files.manifest)),
        "jsonl_sha256": manifest["files"]["jsonl"]["sha256"],
        "preference_path": dg.MetadataValue.path(str(files.preference)),
        "split_folder": dg.MetadataValue.path(str(files.folder)),
        "preference_pairs": (manifest.get("preference") or {}).get("pairs", 0),
        "label_counts": dg.MetadataValue.json(manifest["label_counts"]),
        "label_share": dg.MetadataValue.md(
            "| label | samples | share |\n|---|---:|---:|\n" + share_rows
        ),
        "label_share_chart": dg.MetadataValue.md(
            as_markdown_image(
                label_share_png(manifest["label_counts"], f"Label share, {manifest['version']}"),
                "label share",
            )
        ),
        "dagster/row_count": total,
        "republished": republished,
        "dashboards": dg.MetadataValue.url(dashboard_url(settings, "samples")),
    }
    for label, count in manifest["label_counts"].items():
        metadata[f"label_share/{label}"] = round(count / total, 4)
    for kind, count in (manifest.get("pii_redactions") or {}).items():
        metadata[f"pii_redacted/{kind}"] = count
    yield dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(manifest["version"]))
