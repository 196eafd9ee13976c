"""What a fine-tuning run gets: a verified dataset version, split into train/validation chat
files, and the recipe that says exactly what runs on it."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from qe_assets.ingest.queues.inbox import fsync_dir
from qe_assets.release.dataset import exported_sample_ids
from qe_assets.release.export import (
    VersionFiles,
    format_stamps,
    line_chunks,
    sha256_file,
    split_file_problems,
    version_format_problems,
)
from qe_assets.settings import Settings
from qe_assets.store import select_frame

if TYPE_CHECKING:  # typing only: the backend configuration, not the backends
    from qe_assets.lib.resources import FineTuneBackendConfig


class DatasetInvalid(RuntimeError):
    """The files of a version are missing or differ from what was committed."""


@dataclass(frozen=True)
class TrainingInputs:
    run_id: str
    version: str
    backend: str
    base_model: str
    suffix: str
    hyperparameters: dict[str, Any]
    jsonl_path: str
    chat_path: str
    manifest_path: str
    train_chat_path: str
    validation_chat_path: str | None
    train_records_path: str
    validation_records_path: str | None
    samples: int
    train: int
    validation: int
    previous_model: str | None = None
    weighting: dict[str, Any] = field(default_factory=dict)
    # sft trains on the chat/record files, dpo on the preference pairs (QE_FINETUNE_METHOD). The
    # pairs are the version's own per-split files (verified against its manifest); recipes
    # written before they existed load with the defaults.
    method: str = "sft"
    preference_pairs: int = 0
    train_preference_path: str | None = None
    validation_preference_path: str | None = None
    train_openai_preference_path: str | None = None
    validation_openai_preference_path: str | None = None
    # A local trainer refuses the run when more than this share of a split cannot fit its
    # max_length even without context documents (QE_TRAIN_MAX_DROPPED_SHARE).
    max_dropped_share: float = 0.01

    def recipe(self) -> dict[str, Any]:
        """JSON-able description of the run: inputs, model, settings; no secrets."""
        return asdict(self)


def _files_of(row: dict[str, Any]) -> VersionFiles:
    return VersionFiles(Path(row["jsonl_path"]), Path(row["chat_path"]), Path(row["manifest_path"]))


def verified_version(conn: duckdb.DuckDBPyConnection, version: str) -> dict[str, Any]:
    rows = select_frame(
        conn,
        "SELECT version, jsonl_path, chat_path, manifest_path, sha256, chat_sha256, "
        "manifest_sha256, sample_count, train_count, validation_count "
        "FROM dataset_versions WHERE version = ?",
        [version],
    ).rows(named=True)
    if not rows:
        raise DatasetInvalid(f"dataset version {version} is not in dataset_versions")
    row = rows[0]
    for path_key, sha_key in (
        ("jsonl_path", "sha256"),
        ("chat_path", "chat_sha256"),
        ("manifest_path", "manifest_sha256"),
    ):
        path = Path(row[path_key])
        if not path.exists():
            raise DatasetInvalid(f"{version}: {path} is missing")
        if sha256_file(path) != row[sha_key]:
            raise DatasetInvalid(f"{version}: {path.name} differs from its committed sha256")
    # The committed manifest holds the sha256 of every other file of the version.
    files = _files_of(row)
    manifest = json.loads(files.manifest.read_text("utf-8"))
    if problems := split_file_problems(files, manifest):
        raise DatasetInvalid(f"{version}: {'; '.join(problems[:3])}")
    return {**row, "manifest": manifest}


# A version whose completions are mostly `naive` (the original wrong answer behind a prefix)
# teaches a model little: a real backend trains on it only when asked to.
NAIVE_MAX_SHARE = 0.5


def naive_refusal(
    conn: duckdb.DuckDBPyConnection, version: str, backend: str, allow_naive: bool
) -> str | None:
    """Why `backend` must not train on `version`, or None: more than half of its completions are
    naive and QE_FINETUNE_ALLOW_NAIVE is off. The `none` backend trains nothing and is never
    refused."""
    if backend == "none" or allow_naive:
        return None
    ((total, naive),) = conn.execute(
        """
        SELECT count(*), count(*) FILTER (c.mode = 'naive')
        FROM dataset_samples d JOIN completions c USING (sample_id) WHERE d.version = ?
        """,
        [version],
    ).fetchall()
    if not total or naive / total <= NAIVE_MAX_SHARE:
        return None
    return (
        f"{version}: {naive} of {total} completions are naive (the original answer behind a "
        f"prefix), so {backend} would learn little from it; regenerate them with an LLM "
        "(OPENAI_API_KEY, QE_LLM_MODEL) or review them, or set QE_FINETUNE_ALLOW_NAIVE=true to "
        "train on them anyway"
    )


def prepare_inputs(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    backend: FineTuneBackendConfig,
    version: str,
    run_id: str,
    previous_model: str | None,
    format_checked: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainingInputs:
    """Verify the version's files and write its train/validation chat files for the run, with
    the recipe of `backend` (the format rules and folders come from `settings`).

    `format_checked`: the file stamps a passed `dataset_format_valid` recorded for this version.
    Files that still match them (and, verified here, their committed sha256) are the bytes the
    check validated, and are not parsed again."""
    row = verified_version(conn, version)
    # The blocking check stops a release run, but fine_tuned_model can be launched on its own:
    # never train on, or upload, a version that breaks the format rules.
    files = _files_of(row)
    if format_checked and format_stamps(files) == format_checked:
        problems: list[str] = []
        if log is not None:
            log(f"{version}: dataset_format_valid passed on these very files; not parsed again")
    else:
        problems, _ = version_format_problems(files, settings.min_dataset_examples)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise DatasetInvalid(f"{version} breaks the dataset format rules: {shown}")
    workdir = Path(settings.data_dir) / "finetune" / run_id
    # Everything is written into a temp folder and renamed into place once complete, so a crash
    # never leaves a run folder without its recipe; a complete folder of an attempt whose row was
    # never saved is replaced by the retry (same run id).
    remove_stale_folders(workdir.parent)
    temp = workdir.with_name(f".{run_id}.{uuid.uuid4().hex[:8]}.tmp")
    temp.mkdir(parents=True)
    try:
        inputs = _write_inputs(
            conn, settings, backend, row, version, run_id, workdir, temp, previous_model
        )
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if workdir.exists():
        shutil.rmtree(workdir)
    os.replace(temp, workdir)
    fsync_dir(workdir.parent)
    return inputs


def _preference_inputs(row: dict[str, Any], method: str) -> dict[str, Any]:
    """The recipe's preference fields: the version's per-split pair files that hold pairs."""
    files = _files_of(row)
    counted = row["manifest"].get("split_files", {})
    fields: dict[str, Any] = {"method": method}
    for split in ("train", "validation"):
        for fmt, key in (("preference", "preference"), ("openai_preference", "openai_preference")):
            lines = counted.get(split, {}).get(fmt, {}).get("lines", 0)
            fields[f"{split}_{key}_path"] = (
                str(files.split_file(split, fmt, row["manifest"])) if lines else None
            )
    fields["preference_pairs"] = (row["manifest"].get("preference") or {}).get("pairs", 0)
    if method == "dpo" and fields["train_preference_path"] is None:
        raise DatasetInvalid(
            f"{row['version']}: QE_FINETUNE_METHOD=dpo but the version has no preference pair on "
            "its train side (pairs come from human edits and judge-approved LLM rewrites)"
        )
    return fields


def remove_stale_folders(finetune_dir: Path) -> None:
    """Temp folders of preparations a crash interrupted."""
    if finetune_dir.exists():
        for path in finetune_dir.glob(".*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def _write_inputs(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    backend: FineTuneBackendConfig,
    row: dict[str, Any],
    version: str,
    run_id: str,
    workdir: Path,
    temp: Path,
    previous_model: str | None,
) -> TrainingInputs:
    """The split files and recipe.json in `temp`, fsynced, naming their final paths in
    `workdir`."""
    if _has_split_files(row["manifest"]):
        paths = _link_split_files(row, workdir, temp)
    else:  # a version cut before versions had their per-split folder
        paths = _write_split_files(row, _version_splits(conn, version), workdir, temp)
    if paths["train_chat"] is None or paths["train_record"] is None:
        raise DatasetInvalid(f"{version}: no training examples after the split")
    inputs = _training_inputs(settings, backend, row, version, run_id, paths, previous_model)
    with open(temp / "recipe.json", "wb") as handle:
        handle.write(json.dumps(inputs.recipe(), ensure_ascii=False, indent=2).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(temp)
    return inputs


def _version_splits(conn: duckdb.DuckDBPyConnection, version: str) -> pl.DataFrame:
    """sample_id → split of the version's samples, under both the stored and the exported id."""
    splits = select_frame(
        conn, "SELECT sample_id, split FROM dataset_samples WHERE version = ?", [version]
    )
    # The files show a pseudonym for an id holding PII (QE_PII_REDACTION): match either form.
    return pl.concat(
        [splits, splits.with_columns(exported_sample_ids(splits["sample_id"]))]
    ).unique("sample_id", maintain_order=True)


_SPLIT_FILES = {
    (split, column): f"{split}.{suffix}"
    for split in ("train", "validation")
    for column, suffix in (("chat", "chat.jsonl"), ("record", "records.jsonl"))
}


_SPLIT_FORMAT = {"chat": "chat", "record": "records"}  # run file column → version split format


def _has_split_files(manifest: dict[str, Any]) -> bool:
    split_files = manifest.get("split_files") or {}
    return all(
        _SPLIT_FORMAT[column] in split_files.get(split, {}) for split, column in _SPLIT_FILES
    )


def _link_split_files(row: dict[str, Any], workdir: Path, temp: Path) -> dict[str, str | None]:
    """The version's own per-split records and chat files (hashed against its manifest by
    `verified_version`), hard-linked into `temp`: the same lines in the same order as splitting
    the flat files again, without reading or writing a byte. A version is immutable, so are its
    links; one edited in place no longer matches the committed sha256, and the next run refuses
    the version. Copied (and fsynced) where a link is impossible, e.g. across file systems."""
    files = _files_of(row)
    counted = row["manifest"]["split_files"]
    paths: dict[str, str | None] = {}
    for (split, column), name in _SPLIT_FILES.items():
        fmt = _SPLIT_FORMAT[column]
        if not counted[split][fmt]["lines"]:
            paths[f"{split}_{column}"] = None
            continue
        source = files.split_file(split, fmt, row["manifest"])
        try:
            os.link(source, temp / name)
        except OSError:
            shutil.copyfile(source, temp / name)
            with open(temp / name, "rb") as handle:
                os.fsync(handle.fileno())
        paths[f"{split}_{column}"] = str(workdir / name)
    return paths


def _write_split_files(
    row: dict[str, Any], splits: pl.DataFrame, workdir: Path, temp: Path
) -> dict[str, str | None]:
    """The version's records and chat lines into per-split files in `temp`, fsynced; returns
    `<split>_<chat|record>` → final path in `workdir` (None where a split has no line)."""
    written: set[tuple[str, str]] = set()
    with ExitStack() as stack:
        sinks = {
            key: stack.enter_context(open(temp / name, "wb")) for key, name in _SPLIT_FILES.items()
        }
        # Chat lines are written in the same order as the JSONL records: split them in step,
        # a chunk at a time, so memory stays flat however large the version is.
        chunks = zip(
            line_chunks(Path(row["jsonl_path"])), line_chunks(Path(row["chat_path"])), strict=True
        )
        for record_chunk, chat_chunk in chunks:
            lines = pl.DataFrame(
                {"record": record_chunk, "chat": chat_chunk},
                schema={"record": pl.Binary, "chat": pl.Binary},
            )
            sample_ids = lines["record"].cast(pl.String).str.json_path_match("$.sample_id")
            lines = lines.with_columns(sample_id=sample_ids).join(
                splits, on="sample_id", how="left", maintain_order="left"
            )
            for (split, column), sink in sinks.items():
                part = lines.filter(pl.col("split") == split)[column]
                if part.len():
                    sink.write(
                        b"".join(
                            line if line.endswith(b"\n") else line + b"\n"
                            for line in part.to_list()
                        )
                    )
                    written.add((split, column))
        for sink in sinks.values():
            sink.flush()
            os.fsync(sink.fileno())
    paths: dict[str, str | None] = {}
    for (split, column), name in _SPLIT_FILES.items():
        if (split, column) in written:
            paths[f"{split}_{column}"] = str(workdir / name)
        else:
            (temp / name).unlink(missing_ok=True)
            paths[f"{split}_{column}"] = None
    return paths


def _training_inputs(
    settings: Settings,
    backend: FineTuneBackendConfig,
    row: dict[str, Any],
    version: str,
    run_id: str,
    paths: dict[str, str | None],
    previous_model: str | None,
) -> TrainingInputs:
    """The recipe: what the backend trains on, from what, and how."""
    return TrainingInputs(
        **_preference_inputs(row, backend.method),
        run_id=run_id,
        version=version,
        backend=backend.name,
        base_model=previous_model or backend.base_model,
        suffix=backend.suffix,
        hyperparameters=dict(backend.hyperparameters),
        jsonl_path=row["jsonl_path"],
        chat_path=row["chat_path"],
        manifest_path=row["manifest_path"],
        train_chat_path=paths["train_chat"],
        validation_chat_path=paths["validation_chat"],
        train_records_path=paths["train_record"],
        validation_records_path=paths["validation_record"],
        samples=int(row["sample_count"]),
        train=int(row["train_count"]),
        validation=int(row["validation_count"]),
        previous_model=previous_model,
        max_dropped_share=settings.train_max_dropped_share,
        weighting={
            "openai": "assistant weight 0/1 in the chat file "
            f"(QE_CHAT_WEIGHT_THRESHOLD={settings.chat_weight_threshold})",
            "command": "continuous `weight` (= confidence) per record in the JSONL file",
        },
    )
