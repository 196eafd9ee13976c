"""What a fine-tuning run gets: a verified dataset version, split into train/validation chat
files, and the recipe that says exactly what runs on it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from qe_assets.export import VersionFiles, sha256_file, version_format_problems
from qe_assets.settings import Settings
from qe_assets.store import query_frame


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

    def recipe(self) -> dict[str, Any]:
        """JSON-able description of the run: inputs, model, settings; no secrets."""
        return asdict(self)


def _lines(path: Path, name: str) -> pl.DataFrame:
    # JSON lines never contain a raw U+001F, so it is a safe "no separator" for whole lines.
    return pl.read_csv(
        path,
        has_header=False,
        separator="\x1f",
        quote_char=None,
        schema={name: pl.String},
    )


def verified_version(conn: duckdb.DuckDBPyConnection, version: str) -> dict[str, Any]:
    rows = query_frame(
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
    return row


def prepare_inputs(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    version: str,
    run_id: str,
    previous_model: str | None,
) -> TrainingInputs:
    """Verify the version's files and write its train/validation chat files for the run."""
    row = verified_version(conn, version)
    # The blocking check stops a release run, but fine_tuned_model can be launched on its own:
    # never train on, or upload, a version that breaks the format rules.
    files = VersionFiles(
        Path(row["jsonl_path"]), Path(row["chat_path"]), Path(row["manifest_path"])
    )
    problems, _ = version_format_problems(files, settings.min_dataset_examples)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise DatasetInvalid(f"{version} breaks the dataset format rules: {shown}")
    splits = query_frame(
        conn, "SELECT sample_id, split FROM dataset_samples WHERE version = ?", [version]
    )
    records = _lines(Path(row["jsonl_path"]), "record")
    # Chat lines are written in the same order as the JSONL records.
    lines = pl.concat(
        [
            records.select(
                pl.col("record").str.json_path_match("$.sample_id").alias("sample_id"), "record"
            ),
            _lines(Path(row["chat_path"]), "chat"),
        ],
        how="horizontal",
    ).join(splits, on="sample_id", how="left", maintain_order="left")
    workdir = Path(settings.data_dir) / "finetune" / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str | None] = {}
    for split in ("train", "validation"):
        part = lines.filter(pl.col("split") == split)
        for column, suffix in (("chat", "chat.jsonl"), ("record", "records.jsonl")):
            key = f"{split}_{column}"
            if part.is_empty():
                paths[key] = None
                continue
            target = workdir / f"{split}.{suffix}"
            target.write_text("".join(f"{line}\n" for line in part[column]), encoding="utf-8")
            paths[key] = str(target)
    if paths["train_chat"] is None or paths["train_record"] is None:
        raise DatasetInvalid(f"{version}: no training examples after the split")
    inputs = TrainingInputs(
        run_id=run_id,
        version=version,
        backend=settings.finetune_backend,
        base_model=previous_model or settings.finetune_base_model,
        suffix=settings.finetune_suffix,
        hyperparameters=dict(settings.finetune_hyperparameters),
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
        weighting={
            "openai": "assistant weight 0/1 in the chat file "
            f"(QE_CHAT_WEIGHT_THRESHOLD={settings.chat_weight_threshold})",
            "command": "continuous `weight` (= confidence) per record in the JSONL file",
        },
    )
    (workdir / "recipe.json").write_text(
        json.dumps(inputs.recipe(), ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return inputs
