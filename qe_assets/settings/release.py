"""Releases: splits, export format, dataset checks and when a version is cut."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import _bool, _float, _int, _publish_url

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "validation_share": ("QE_VALIDATION_SHARE", _float("QE_VALIDATION_SHARE", 0.0, 0.5)),
    "chat_system_message": ("QE_CHAT_SYSTEM_MESSAGE", _bool("QE_CHAT_SYSTEM_MESSAGE")),
    "chat_weight_threshold": (
        "QE_CHAT_WEIGHT_THRESHOLD",
        _float("QE_CHAT_WEIGHT_THRESHOLD"),
    ),
    "export_batch_size": ("QE_EXPORT_BATCH_SIZE", _int("QE_EXPORT_BATCH_SIZE")),
    "pii_redaction": ("QE_PII_REDACTION", _bool("QE_PII_REDACTION")),
    "max_label_share": ("QE_MAX_LABEL_SHARE", _float("QE_MAX_LABEL_SHARE")),
    "max_unspecified_share": ("QE_MAX_UNSPECIFIED_SHARE", _float("QE_MAX_UNSPECIFIED_SHARE")),
    "max_unknown_label_share": (
        "QE_MAX_UNKNOWN_LABEL_SHARE",
        _float("QE_MAX_UNKNOWN_LABEL_SHARE"),
    ),
    "max_label_drift": ("QE_MAX_LABEL_DRIFT", _float("QE_MAX_LABEL_DRIFT")),
    "min_dataset_examples": ("QE_MIN_DATASET_EXAMPLES", _int("QE_MIN_DATASET_EXAMPLES")),
    "finetune_threshold": ("QE_FINETUNE_THRESHOLD", _int("QE_FINETUNE_THRESHOLD")),
    "finetune_sensor_running": (
        "QE_FINETUNE_SENSOR_RUNNING",
        _bool("QE_FINETUNE_SENSOR_RUNNING"),
    ),
    "publish_url": ("QE_PUBLISH_URL", _publish_url),
    "forget_delete_remote": ("QE_FORGET_DELETE_REMOTE", _bool("QE_FORGET_DELETE_REMOTE")),
}


class ReleaseSettings(BaseModel):
    """Releases: splits, export format, dataset checks and when a version is cut."""

    model_config = ConfigDict(frozen=True)

    validation_share: float = Field(
        0.1,
        description="Share of questions (by hash of the "
        "normalised question) in the validation split.",
    )
    chat_system_message: bool = Field(
        True, description="Include a system message in the chat file."
    )
    chat_weight_threshold: float | None = Field(
        None,
        description="Set: the chat file's "
        "assistant `weight` is 1 when confidence ≥ it, else 0 (the only weights OpenAI accepts).",
    )
    export_batch_size: int = Field(
        10_000,
        description="Completions read per export window: at "
        "most that many samples in memory at once.",
    )
    pii_redaction: bool = Field(
        True,
        description="Redact e-mail, phone, CN ID, card numbers and "
        "IPs from exported prompts, completions and labels, and pseudonymise exported sample ids "
        "that hold PII.",
    )
    max_label_share: float = Field(
        0.8, description="`label_distribution` warns when one label is above this share."
    )
    max_unspecified_share: float = Field(
        0.2, description="`label_distribution` warns when `unspecified` is above this share."
    )
    max_unknown_label_share: float = Field(
        0.1, description="`label_distribution` warns when unknown labels are above this share."
    )
    max_label_drift: float = Field(
        0.3,
        description="`label_drift` warns when the total "
        "variation distance to the previous version's label shares is above this.",
    )
    min_dataset_examples: int = Field(
        10, description="`dataset_format_valid` fails a version with fewer chat examples."
    )
    finetune_threshold: int = Field(
        1000,
        description="Ready samples (ok completions not yet in "
        "a version, not waiting for review) that trigger a new version and a fine-tune.",
    )
    # The loop runs by itself under `make ui`: both sensors start running (set false to stop).
    finetune_sensor_running: bool = Field(
        True,
        description="Start the release sensor "
        "(`finetune_threshold_sensor`) running; the UI toggle overrides it.",
    )
    publish_url: str | None = Field(
        None,
        description=(
            "Where checked versions are published (none by default): `s3://BUCKET[/PREFIX]` "
            "(any S3-compatible store; endpoint and credentials from the AWS variables), "
            "`file:///PATH`, or `hf:///PATH` (a Hugging Face dataset-repo folder per version). "
            "See Publishing."
        ),
    )
    forget_delete_remote: bool = Field(
        False,
        description=(
            "`qe forget` deletes the published copy of a superseded version; off: it only "
            "removes its manifest (the commit marker), so readers no longer see it."
        ),
    )
