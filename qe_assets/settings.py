"""Every knob of the pipeline, read from the environment in one typed place.

`Settings.from_env()` runs when the Dagster definitions load, so a bad value fails there
with the name of the variable to fix instead of deep inside a run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

# The service side's settings parse with the same rules (qe_assets.service.config); the names
# below are re-exported here, where the pipeline's code has always found them.
from qe_assets.service.config import (  # noqa: F401
    COUNT_FLUSH_BOUNDS,
    DEFAULT_BASE_MODEL,
    DEFAULT_CAPTURE_THRESHOLD,
    DEFAULT_COUNT_FLUSH_SECONDS,
    DEFAULT_DATA_DIR,
    KAFKA_ENV_PREFIX,
    KAFKA_HOST,
    KAFKA_TOPIC,
    REDIS_LIST,
    KafkaTarget,
    SettingsError,
    kafka_environment,
    parse_kafka_url,
    queue_url,
)
from qe_assets.service.config import number as _number

if TYPE_CHECKING:
    from qe_assets.evaluation.sequential import Policy

FinetuneBackend = Literal["none", "openai", "command"]
FINETUNE_BACKENDS: tuple[str, ...] = get_args(FinetuneBackend)
# sft: the chat/record files; dpo: the preference pairs (chosen = correction, rejected = original).
FinetuneMethod = Literal["sft", "dpo"]
FINETUNE_METHODS: tuple[str, ...] = get_args(FinetuneMethod)
INSTRUCTION_LANGUAGES = ("auto", "zh", "en")
# direct: the evaluation gate promotes; canary: it starts an A/B test at the ramp's first share.
ROLLOUT_MODES = ("direct", "canary")


def estimated_cost(
    prompt_tokens: int,
    completion_tokens: int,
    price_input_per_1m: float,
    price_output_per_1m: float,
) -> float:
    """The estimated LLM cost of some tokens at per-million prices (QE_LLM_PRICE_*_PER_1M): the
    one formula behind `qe status`, the completions metadata and the evaluation's spend."""
    return round(
        prompt_tokens * price_input_per_1m / 1e6 + completion_tokens * price_output_per_1m / 1e6, 6
    )


def finetune_backend_problem(backend: str, command: str | None) -> str | None:
    """What is wrong with a fine-tune backend and its command, in one line naming the variable:
    the one rule behind `Settings.from_env` and `FineTuneBackendResource` (so a launchpad
    override is held to it too)."""
    if backend == "command" and not (command or "").strip():
        return (
            "QE_FINETUNE_BACKEND=command needs QE_FINETUNE_COMMAND (the training command, "
            "e.g. `python examples/finetune_trl_lora.py`)"
        )
    return None


def _ruled(parse: Callable[[str], Any], rule: str) -> Callable[[str], Any]:
    """Attach the human-readable rule a parser enforces; the configuration reference prints it."""
    parse.rule = rule  # type: ignore[attr-defined]
    return parse


def _bounds(lo: float | None, hi: float | None) -> str:
    if hi is None:
        return f"≥ {lo:g}" if lo is not None else "any"
    return f"{lo:g} to {hi:g}"


def _float(name: str, lo: float | None = 0.0, hi: float | None = 1.0) -> Callable[[str], Any]:
    return _ruled(
        lambda raw: _number(name, raw, lo=lo, hi=hi, integer=False), f"number, {_bounds(lo, hi)}"
    )


def _int(name: str, lo: int = 1) -> Callable[[str], Any]:
    return _ruled(
        lambda raw: _number(name, raw, lo=lo, hi=None, integer=True),
        f"integer, {_bounds(lo, None)}",
    )


def _text(raw: str) -> str:
    return raw.strip()


_ruled(_text, "text")


def _choice(name: str, options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)}; got {raw!r}")
        return value

    return _ruled(parse, "one of " + ", ".join(f"`{option}`" for option in options))


def _bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

    return _ruled(parse, "true/false (also 1/0, yes/no, on/off)")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}


def parse_duration(text: str) -> float | None:
    """`90s`, `45m`, `1h`, `30d` or plain seconds as seconds; None when it is none of those."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if match is None:
        return None
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def _duration(name: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        seconds = parse_duration(raw)
        if seconds is None:
            raise SettingsError(
                f"{name} must be a duration such as 90s, 45m, 1h or 2d; got {raw!r}"
            )
        return seconds

    return _ruled(parse, "duration: `90s`, `45m`, `1h`, `2d` or seconds")


def _json_object(name: str) -> Callable[[str], dict[str, Any]]:
    def parse(raw: str) -> dict[str, Any]:
        try:
            value = json.loads(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a JSON object, got {raw!r}") from None
        if not isinstance(value, dict):
            raise SettingsError(f"{name} must be a JSON object, got {raw!r}")
        return value

    return _ruled(parse, "JSON object")


def _model_map(raw: str) -> dict[str, str]:
    value = _json_object("QE_EVAL_MODEL_MAP")(raw)
    bad = [key for key, name in value.items() if not isinstance(name, str) or not name.strip()]
    if bad:
        raise SettingsError(
            f"QE_EVAL_MODEL_MAP must map model ids to served model names (non-empty strings); "
            f"{bad[0]!r} does not"
        )
    return value


_ruled(_model_map, "JSON object of model id → served name (non-empty strings)")


def _ramp(raw: str) -> list[float]:
    name = "QE_AB_RAMP"
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    shares = tuple(_number(name, part, lo=0.0, hi=1.0, integer=False) for part in parts)
    if not shares or any(s <= 0 for s in shares) or list(shares) != sorted(set(shares)):
        raise SettingsError(
            f"{name} must be increasing shares in (0, 1] separated by commas, such as "
            f"0.05,0.25,0.5; got {raw!r}"
        )
    return list(shares)


_ruled(_ramp, "increasing shares in (0, 1], comma-separated")


def _memory_size(raw: str) -> str:
    value = raw.strip().replace(" ", "")
    if not re.fullmatch(r"\d+(\.\d+)?([KMGT]i?B|%)", value, flags=re.IGNORECASE):
        raise SettingsError(
            f"QE_DUCKDB_MEMORY_LIMIT must be a size such as 512MB, 2GB or 4GiB, or a share of "
            f"the machine's memory such as 25%; got {raw!r}"
        )
    return value


_ruled(_memory_size, "size (`512MB`, `4GiB`) or share of RAM (`25%`)")


def _serve_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise SettingsError(
            f"QE_SERVE_URL must be the base URL of `qe serve`, such as http://127.0.0.1:8787; "
            f"got {raw!r}"
        )
    return value


_ruled(_serve_url, "`http://` or `https://` base URL")


_queue_url = _ruled(queue_url, "`redis://`, `rediss://`, `unix://` or `kafka://` URL")

# QE_PUBLISH_URL's schemes: an S3-compatible bucket, a directory, a Hugging Face dataset-repo
# folder (what `huggingface_hub.upload_folder` uploads).
PUBLISH_SCHEMES = ("s3", "file", "hf")


def _publish_url(raw: str) -> str:
    value = raw.strip()
    parts = urlsplit(value)
    if "@" in parts.netloc:
        # Never echo the value: it may hold a key. Credentials come from the client's own chain.
        raise SettingsError(
            "QE_PUBLISH_URL must not carry credentials (user:secret@); set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or a profile) instead"
        )
    if parts.scheme not in PUBLISH_SCHEMES or parts.query or parts.fragment:
        raise SettingsError(
            "QE_PUBLISH_URL must look like s3://BUCKET[/PREFIX], file:///PATH or hf:///PATH; "
            f"got {value!r}"
        )
    if parts.scheme == "s3" and not parts.netloc:
        raise SettingsError(f"QE_PUBLISH_URL needs a bucket: s3://BUCKET[/PREFIX]; got {value!r}")
    if parts.scheme in ("file", "hf") and (parts.netloc or not parts.path.startswith("/")):
        raise SettingsError(
            f"QE_PUBLISH_URL needs an absolute path: {parts.scheme}:///PATH; got {value!r}"
        )
    if parts.scheme == "s3" and importlib.util.find_spec("boto3") is None:
        raise SettingsError("QE_PUBLISH_URL=s3://… needs boto3: pip install 'qe_assets[publish]'")
    return value.rstrip("/")


_ruled(_publish_url, "`s3://BUCKET[/PREFIX]`, `file:///PATH` or `hf:///PATH`")

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "data_dir": ("QE_DATA_DIR", _text),
    "duckdb_path": ("QE_DUCKDB_PATH", _text),
    "duckdb_memory_limit": ("QE_DUCKDB_MEMORY_LIMIT", _memory_size),
    "queue_url": ("QE_QUEUE_URL", _queue_url),
    "queue_consumer": ("QE_QUEUE_CONSUMER", _text),
    "capture_threshold": ("QE_CAPTURE_THRESHOLD", _float("QE_CAPTURE_THRESHOLD")),
    "count_flush_seconds": (
        "QE_COUNT_FLUSH_SECONDS",
        _float("QE_COUNT_FLUSH_SECONDS", *COUNT_FLUSH_BOUNDS),
    ),
    "ingest_batch_size": ("QE_INGEST_BATCH_SIZE", _int("QE_INGEST_BATCH_SIZE")),
    "min_confidence": ("QE_MIN_CONFIDENCE", _float("QE_MIN_CONFIDENCE")),
    "confidence_factor": ("QE_CONFIDENCE_FACTOR", _float("QE_CONFIDENCE_FACTOR", 0.0, None)),
    "context_top_k": ("QE_CONTEXT_TOP_K", _int("QE_CONTEXT_TOP_K")),
    "context_max_chars": ("QE_CONTEXT_MAX_CHARS", _int("QE_CONTEXT_MAX_CHARS")),
    "instruction_language": (
        "QE_INSTRUCTION_LANGUAGE",
        _choice("QE_INSTRUCTION_LANGUAGE", INSTRUCTION_LANGUAGES),
    ),
    "validation_share": ("QE_VALIDATION_SHARE", _float("QE_VALIDATION_SHARE", 0.0, 0.5)),
    "spot_check_share": ("QE_SPOT_CHECK_SHARE", _float("QE_SPOT_CHECK_SHARE")),
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
    "finetune_backend": (
        "QE_FINETUNE_BACKEND",
        _choice("QE_FINETUNE_BACKEND", FINETUNE_BACKENDS),
    ),
    "finetune_base_model": ("QE_FINETUNE_BASE_MODEL", _text),
    "finetune_suffix": ("QE_FINETUNE_SUFFIX", _text),
    "finetune_sensor_running": (
        "QE_FINETUNE_SENSOR_RUNNING",
        _bool("QE_FINETUNE_SENSOR_RUNNING"),
    ),
    "finetune_allow_naive": ("QE_FINETUNE_ALLOW_NAIVE", _bool("QE_FINETUNE_ALLOW_NAIVE")),
    "queue_sensor_running": ("QE_QUEUE_SENSOR_RUNNING", _bool("QE_QUEUE_SENSOR_RUNNING")),
    "sensor_interval_seconds": (
        "QE_SENSOR_INTERVAL_SECONDS",
        _int("QE_SENSOR_INTERVAL_SECONDS", 5),
    ),
    "max_queue_age_seconds": ("QE_MAX_QUEUE_AGE", _duration("QE_MAX_QUEUE_AGE")),
    "max_review_age_seconds": ("QE_MAX_REVIEW_AGE", _duration("QE_MAX_REVIEW_AGE")),
    "max_review_backlog": ("QE_MAX_REVIEW_BACKLOG", _int("QE_MAX_REVIEW_BACKLOG")),
    "max_reject_share": ("QE_MAX_REJECT_SHARE", _float("QE_MAX_REJECT_SHARE")),
    "finetune_hyperparameters": (
        "QE_FINETUNE_HYPERPARAMETERS",
        _json_object("QE_FINETUNE_HYPERPARAMETERS"),
    ),
    "finetune_command": ("QE_FINETUNE_COMMAND", _text),
    "finetune_method": ("QE_FINETUNE_METHOD", _choice("QE_FINETUNE_METHOD", FINETUNE_METHODS)),
    "finetune_poll_seconds": (
        "QE_FINETUNE_POLL_SECONDS",
        _float("QE_FINETUNE_POLL_SECONDS", 0.0, None),
    ),
    "finetune_deadline_seconds": (
        "QE_FINETUNE_DEADLINE_SECONDS",
        _float("QE_FINETUNE_DEADLINE_SECONDS", 0.0, None),
    ),
    "llm_model": ("QE_LLM_MODEL", _text),
    "openai_base_url": ("OPENAI_BASE_URL", _text),
    "llm_concurrency": ("QE_LLM_CONCURRENCY", _int("QE_LLM_CONCURRENCY")),
    "llm_batch_size": ("QE_LLM_BATCH_SIZE", _int("QE_LLM_BATCH_SIZE")),
    "llm_timeout_seconds": ("QE_LLM_TIMEOUT_SECONDS", _float("QE_LLM_TIMEOUT_SECONDS", 0.0, None)),
    "llm_max_retries": ("QE_LLM_MAX_RETRIES", _int("QE_LLM_MAX_RETRIES", 0)),
    "llm_temperature": ("QE_LLM_TEMPERATURE", _float("QE_LLM_TEMPERATURE", 0.0, 2.0)),
    "llm_max_tokens": ("QE_LLM_MAX_TOKENS", _int("QE_LLM_MAX_TOKENS")),
    "llm_judge": ("QE_LLM_JUDGE", _bool("QE_LLM_JUDGE")),
    "llm_judge_model": ("QE_LLM_JUDGE_MODEL", _text),
    "llm_judge_margin": ("QE_LLM_JUDGE_MARGIN", _float("QE_LLM_JUDGE_MARGIN", 0.0, 10.0)),
    "judge_min_agreement": ("QE_JUDGE_MIN_AGREEMENT", _float("QE_JUDGE_MIN_AGREEMENT")),
    "judge_min_decisions": ("QE_JUDGE_MIN_DECISIONS", _int("QE_JUDGE_MIN_DECISIONS")),
    "judge_agreement_window": ("QE_JUDGE_AGREEMENT_WINDOW", _int("QE_JUDGE_AGREEMENT_WINDOW")),
    "serve_url": ("QE_SERVE_URL", _serve_url),
    "publish_url": ("QE_PUBLISH_URL", _publish_url),
    "forget_delete_remote": ("QE_FORGET_DELETE_REMOTE", _bool("QE_FORGET_DELETE_REMOTE")),
    "llm_propose_review": ("QE_LLM_PROPOSE_REVIEW", _bool("QE_LLM_PROPOSE_REVIEW")),
    "eval_share": ("QE_EVAL_SHARE", _float("QE_EVAL_SHARE", 0.0, 0.5)),
    "eval_min_items": ("QE_EVAL_MIN_ITEMS", _int("QE_EVAL_MIN_ITEMS")),
    "eval_margin": ("QE_EVAL_MARGIN", _float("QE_EVAL_MARGIN", 0.0, 0.5)),
    "eval_max_failed_share": (
        "QE_EVAL_MAX_FAILED_SHARE",
        _float("QE_EVAL_MAX_FAILED_SHARE", 0.0, 1.0),
    ),
    "eval_base_url": ("QE_EVAL_BASE_URL", _text),
    "eval_model_map": ("QE_EVAL_MODEL_MAP", _model_map),
    "eval_judge_model": ("QE_EVAL_JUDGE_MODEL", _text),
    "eval_icl_examples": ("QE_EVAL_ICL_EXAMPLES", _int("QE_EVAL_ICL_EXAMPLES", 0)),
    "rollout_mode": ("QE_ROLLOUT", _choice("QE_ROLLOUT", ROLLOUT_MODES)),
    "ab_ramp": ("QE_AB_RAMP", _ramp),
    "ab_alpha": ("QE_AB_ALPHA", _float("QE_AB_ALPHA", 0.001, 0.5)),
    "ab_tau": ("QE_AB_TAU", _float("QE_AB_TAU", 0.001, 1.0)),
    "ab_min_answers": ("QE_AB_MIN_ANSWERS", _int("QE_AB_MIN_ANSWERS")),
    "ab_ramp_max_harm": ("QE_AB_RAMP_MAX_HARM", _float("QE_AB_RAMP_MAX_HARM", 0.0, 1.0)),
    "llm_price_input_per_1m": (
        "QE_LLM_PRICE_INPUT_PER_1M",
        _float("QE_LLM_PRICE_INPUT_PER_1M", 0.0, None),
    ),
    "llm_price_output_per_1m": (
        "QE_LLM_PRICE_OUTPUT_PER_1M",
        _float("QE_LLM_PRICE_OUTPUT_PER_1M", 0.0, None),
    ),
}


class Settings(BaseModel):
    """Typed view of the `QE_*` environment; defaults follow CONTRACT §2.

    Plain pydantic so producers (`qe_assets.capture`) can use it without importing Dagster; the
    Dagster resource `PipelineSettings` inherits these fields, so the launchpad shows them too.
    """

    model_config = ConfigDict(frozen=True)

    # Each description is the variable's line in the configuration reference (docs/configuration.md,
    # generated by `make docs`) and its help text in the Dagster launchpad.
    data_dir: str = Field(
        DEFAULT_DATA_DIR,
        description="Directory that holds all state: the database, "
        "inbox, datasets, fine-tune runs and the Dagster home of `qe ui`.",
    )
    duckdb_path: str | None = Field(
        None,
        description="The DuckDB database; unset: "
        "`$QE_DATA_DIR/qe.duckdb`. The writer lock file lives next to it.",
    )
    # DuckDB's default (80 % of RAM) lets its page cache grow with history; a bound keeps a run's
    # memory flat, and larger-than-memory work spills to disk.
    duckdb_memory_limit: str = Field(
        "1GB",
        description="DuckDB memory limit of the pipeline's "
        "connections; bigger work spills to disk.",
    )
    queue_url: str | None = Field(
        None,
        description="The event queue. Unset: the file inbox "
        "`$QE_DATA_DIR/inbox/`. `redis://HOST:PORT/DB`: the list `quality_events`. "
        "`kafka://HOST:PORT[,HOST:PORT…][/TOPIC][?property=value…]`: a Kafka topic "
        "(default `quality_events`), see Queues.",
    )
    queue_consumer: str = Field(
        "default",
        description="Names this ingester's Redis processing "
        "list (`quality_events:processing:<name>`) or Kafka consumer group (`qe_assets.<name>`).",
    )
    capture_threshold: float = Field(
        DEFAULT_CAPTURE_THRESHOLD,
        description="`QualityCapture` sends events whose "
        "`score` is below this; the others are skipped.",
    )
    count_flush_seconds: float = Field(
        DEFAULT_COUNT_FLUSH_SECONDS,
        description="How often a producer process sends its per-model answer counts.",
    )
    ingest_batch_size: int = Field(
        5_000,
        description="Records per ingest / annotate transaction; bounds memory "
        "(naive completions, a short answer each, take ten times as many per transaction).",
    )
    min_confidence: float = Field(
        0.6,
        description="Sample gate: a sample with lower confidence "
        "is routed to human review instead of training.",
    )
    confidence_factor: float = Field(1.5, description="`confidence = min(1, score × factor)`.")
    context_top_k: int = Field(3, description="Documents (highest score first) in the prompt.")
    context_max_chars: int = Field(500, description="Characters kept per document in the prompt.")
    instruction_language: str = Field(
        "auto",
        description="Language of the correction "
        "instruction: `auto` (Chinese when the question has a Han character), `zh`, `en`.",
    )
    validation_share: float = Field(
        0.1,
        description="Share of questions (by hash of the "
        "normalised question) in the validation split.",
    )
    spot_check_share: float = Field(
        0.02, description="Share of `train` samples held for a human spot check (deterministic)."
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
    finetune_backend: str = Field(
        "none",
        description="`none` (write the recipe only), `openai` "
        "(a fine-tuning job) or `command` (`QE_FINETUNE_COMMAND` through Dagster Pipes).",
    )
    finetune_base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="Base model of "
        "fine-tuning jobs; a round continues from the newest model of the same backend.",
    )
    finetune_suffix: str = Field("qe", description="Suffix of `openai` fine-tuning jobs.")
    # The loop runs by itself under `make ui`: both sensors start running (set false to stop).
    finetune_sensor_running: bool = Field(
        True,
        description="Start the release sensor "
        "(`finetune_threshold_sensor`) running; the UI toggle overrides it.",
    )
    finetune_allow_naive: bool = Field(
        False,
        description="Let `openai` / `command` train on a "
        "version whose completions are mostly `naive`.",
    )
    queue_sensor_running: bool = Field(
        True,
        description="Start the ingestion sensor "
        "(`queue_sensor`) running; the UI toggle overrides it.",
    )
    sensor_interval_seconds: int = Field(30, description="How often both sensors look, in seconds.")
    max_queue_age_seconds: float = Field(
        3_600.0,
        description="`queue_freshness` warns when the oldest waiting event is older (default 1h).",
    )
    max_review_age_seconds: float = Field(
        86_400.0,
        description="`review_backlog_age` warns "
        "when the oldest pending review is older (default 24h).",
    )
    max_review_backlog: int = Field(
        1_000, description="`review_backlog_size` warns when more samples wait for review."
    )
    max_reject_share: float = Field(
        0.2,
        description="`reject_share_by_source` warns when a "
        "queue kind's rejected share over the last day is above this.",
    )
    finetune_hyperparameters: dict[str, Any] = Field(
        {}, description="Hyperparameters of `openai` fine-tuning jobs."
    )
    finetune_command: str | None = Field(
        None,
        description="The training command of the "
        "`command` backend, e.g. `python examples/finetune_trl_lora.py`; a leading bare "
        "`python` is the interpreter running Dagster, not PATH's.",
    )
    finetune_method: str = Field(
        "sft",
        description="`sft` (chat/record files) or `dpo` (the "
        "preference pairs; `openai` sends `method: dpo`).",
    )
    finetune_poll_seconds: float = Field(30.0, description="Polling interval of an `openai` job.")
    finetune_deadline_seconds: float = Field(
        4 * 3600.0,
        description="How long one run follows "
        "an `openai` job; past it the asset fails and a re-run resumes the same job.",
    )
    llm_model: str | None = Field(
        None,
        description="With `OPENAI_API_KEY`: the model that "
        "rewrites answers in `completions`; unset: naive completions.",
    )
    openai_base_url: str | None = Field(
        None,
        description="An OpenAI-compatible endpoint (vLLM, "
        "Ollama, llama.cpp server, …); unset: OpenAI.",
    )
    llm_concurrency: int = Field(16, description="LLM calls in flight.")
    llm_batch_size: int = Field(200, description="Samples per LLM commit.")
    llm_timeout_seconds: float = Field(60.0, description="Timeout of one LLM request.")
    llm_max_retries: int = Field(4, description="The openai client's retries per request.")
    llm_temperature: float = Field(
        0.2, description="Generation temperature (part of the cache key)."
    )
    llm_max_tokens: int = Field(1024, description="Generation token limit (part of the cache key).")
    llm_judge: bool = Field(
        False,
        description="Judge each rewrite against the original; a "
        "rewrite not better by the margin becomes `rejected_by_judge`.",
    )
    llm_judge_model: str | None = Field(
        None, description="The judge's model; unset: `QE_LLM_MODEL`."
    )
    llm_judge_margin: float = Field(
        1.0, description="Judge score (1–10) the rewrite must gain over the original."
    )
    llm_propose_review: bool = Field(
        True,
        description="LLM mode: review samples get a `proposed` completion a reviewer can accept.",
    )
    llm_price_input_per_1m: float = Field(
        0.0, description="Price per million prompt tokens, for the cost estimate."
    )
    llm_price_output_per_1m: float = Field(
        0.0, description="Price per million completion tokens, for the cost estimate."
    )
    # The judge measured against reviewers (docs/judge-calibration.md): below this agreement over
    # the last `judge_agreement_window` decisions (once there are `judge_min_decisions`), the
    # judge's approvals wait for a person instead of going straight into versions.
    judge_min_agreement: float = Field(
        0.8,
        description="Below this agreement with reviewers, the judge's approvals wait for a person.",
    )
    judge_min_decisions: int = Field(
        30,
        description="Reviewer decisions needed before the judge's agreement counts.",
    )
    judge_agreement_window: int = Field(
        200,
        description="The last N reviewer decisions the judge's agreement is measured over.",
    )
    serve_url: str = Field(
        "http://127.0.0.1:8787",
        description="Where `qe serve` answers: the dashboards linked from the assets' metadata.",
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
    # The evaluation gate (docs/evaluation.md). 0 holds nothing out: set a share to build the
    # frozen evaluation set; held-out questions never reach a training file.
    # 5 % gives the gate its 50 items once about 1,000 samples were released.
    eval_share: float = Field(
        0.05,
        description=(
            "Share of questions held out of every file into the frozen evaluation set; 0 holds "
            "nothing out (the gate then has nothing to judge)."
        ),
    )
    eval_min_items: int = Field(
        50, description="Fewer judged pairs give `insufficient_data` (nothing promoted)."
    )
    eval_margin: float = Field(
        0.0, description="The win rate's 95 % lower bound must exceed 0.5 + margin for promotion."
    )
    eval_max_failed_share: float = Field(
        0.05,
        description="Largest share of held-out items that may fail for the judge, the endpoint "
        "or the production model (left out of the count); above it the decision is "
        "`insufficient_data` and the next run evaluates again (at most 3 times). A candidate "
        "that answers empty, truncated, refused or filtered loses that item instead.",
    )
    eval_base_url: str | None = Field(
        None,
        description="Where the candidate and production "
        "models are asked; unset: `OPENAI_BASE_URL`.",
    )
    eval_model_map: dict[str, str] = Field(
        {}, description="Model id → the name the endpoint serves it under."
    )
    eval_judge_model: str | None = Field(
        None, description="The pairwise judge; unset: `QE_LLM_JUDGE_MODEL`, else `QE_LLM_MODEL`."
    )
    eval_icl_examples: int = Field(
        0,
        description="k > 0 also compares the candidate with "
        "production given k train examples in its prompt (reported, not gating).",
    )
    # The A/B rollout (docs/rollout.md): canary makes a gate-passed candidate an A/B test.
    rollout_mode: str = Field(
        "direct",
        description=(
            "`direct`: the gate promotes; `canary`: a candidate that passes the gate becomes "
            "the A/B test's candidate at the first share of the ramp."
        ),
    )
    ab_ramp: list[float] = Field(
        [0.05, 0.25, 0.5],
        description="The candidate's traffic shares, in turn.",
    )
    ab_alpha: float = Field(
        0.05,
        description="Bound on P(ever promoting an equal candidate).",
    )
    ab_tau: float = Field(
        0.05,
        description="The difference of low-score rates the mSPRT is tuned to find fastest.",
    )
    ab_min_answers: int = Field(
        200,
        description="Answers per arm before deciding; at a share before ramping on.",
    )
    ab_ramp_max_harm: float = Field(
        0.01,
        description=(
            "Ramp up only while the candidate's low-score rate is at most this much above "
            "production's."
        ),
    )

    def ab_policy(self) -> Policy:
        """The test's knobs as `qe_assets.evaluation.sequential.Policy`."""
        from qe_assets.evaluation.sequential import Policy

        return Policy(
            alpha=self.ab_alpha,
            tau=self.ab_tau,
            min_answers=self.ab_min_answers,
            ramp=tuple(self.ab_ramp),
            ramp_max_harm=self.ab_ramp_max_harm,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (variable, parse) in ENVIRONMENT.items():
            raw = env.get(variable)
            if raw is not None and raw.strip():
                values[name] = parse(raw)
        settings = cls(**values)
        if settings.judge_agreement_window < settings.judge_min_decisions:
            raise SettingsError(
                f"QE_JUDGE_AGREEMENT_WINDOW ({settings.judge_agreement_window}) must be at least "
                f"QE_JUDGE_MIN_DECISIONS ({settings.judge_min_decisions}): agreement is measured "
                "over the last QE_JUDGE_AGREEMENT_WINDOW decisions"
            )
        problem = finetune_backend_problem(settings.finetune_backend, settings.finetune_command)
        if problem:
            raise SettingsError(problem)
        return settings

    def settings(self) -> Settings:
        """The plain settings (also on the Dagster resource that inherits these fields)."""
        return Settings(**{name: getattr(self, name) for name in Settings.model_fields})

    @property
    def database(self) -> Path:
        return Path(self.duckdb_path) if self.duckdb_path else Path(self.data_dir) / "qe.duckdb"

    @property
    def inbox_dir(self) -> Path:
        return Path(self.data_dir) / "inbox"

    @property
    def datasets_dir(self) -> Path:
        return Path(self.data_dir) / "datasets"

    @property
    def dagster_home(self) -> Path:
        return Path(self.data_dir) / "dagster_home"

    def documented(self) -> dict[str, Any]:
        """Variable name → value in effect, for `qe status` and manifests (holds no secrets)."""
        return {variable: getattr(self, name) for name, (variable, _) in ENVIRONMENT.items()}


SERVE_TOKEN_VARIABLE = "QE_SERVE_TOKEN"


def serve_token(environ: Mapping[str, str] | None = None) -> str | None:
    """QE_SERVE_TOKEN: the secret `qe serve` requires on every request when it binds a
    non-loopback address. Read here rather than kept on `Settings`, whose fields reach the
    Dagster launchpad and every dataset manifest; a secret must reach neither. Never logged."""
    env = os.environ if environ is None else environ
    raw = env.get(SERVE_TOKEN_VARIABLE)
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if len(value) < 16:
        raise SettingsError(
            f"{SERVE_TOKEN_VARIABLE} must be at least 16 characters (e.g. `openssl rand -hex "
            "16`); the value given is shorter"
        )
    return value


# Variables read outside `Settings`: by the CLI, by the Kafka client builder, by the training
# examples and by the tests. The configuration reference lists them beside the settings.
OTHER_VARIABLES: dict[str, tuple[str, str]] = {
    "OPENAI_API_KEY": (
        "unset",
        "The key of the OpenAI-compatible endpoint (LLM completions, judge, `openai` backend, "
        "evaluation). Passed only as a `dg.EnvVar` reference: never logged or stored.",
    ),
    "QE_KAFKA_*": (
        "unset",
        "librdkafka properties that must not be in the URL, e.g. `QE_KAFKA_SASL_PASSWORD` → "
        "`sasl.password` (`_` becomes `.`); read when a client is built, never part of the "
        "settings or the run config.",
    ),
    "QE_SERVE_TOKEN": (
        "unset",
        "The secret `qe serve` requires on every request; needed to bind anything but the "
        "loopback (16+ characters). Never a setting, never logged.",
    ),
    "QE_REVIEWER": ("`$USER`", "Who `qe review` and `qe models` record as the reviewer."),
    "QE_TRL_MODEL": ("required", "TRL examples: the model to adapt (Hugging Face id or folder)."),
    "QE_TRL_DATA": ("`records`", "TRL examples: `records` (weighted loss) or `chat`."),
    "QE_TRL_OUTPUT_DIR": ("`data/models`", "TRL examples: where adapters are written."),
    "QE_TRL_DRY_RUN": ("unset", "TRL examples: `1` checks the records and trains nothing."),
    "QE_SLOW_TRIALS": ("unset", "Tests: number of slow crash / fault trials (opt-in)."),
    "QE_FUZZ_EXAMPLES": ("60", "Tests: hypothesis examples of the fuzz test."),
    "QE_TEST_DVC": (
        "`.venv-dvc/bin/dvc`, else `dvc` on PATH",
        "Tests: the `dvc` the real `dvc pull` test runs (`make test` sets it to the one `make dvc` "
        "installs; set, the test fails instead of skipping when it is missing).",
    ),
    "QE_DOCS_SCREENSHOTS": (
        "unset",
        "Tests: `1` makes the review page and Dagster UI browser tests write their screenshots to "
        "docs/img/ (review.png, asset-graph.png).",
    ),
    "QE_UPDATE_SCREENSHOTS": (
        "unset",
        "Tests: set, the dashboards browser test writes its screenshot to docs/img/.",
    ),
}
# The variables the external contract defines; every other one is an extension of it.
CONTRACT_VARIABLES = frozenset(
    {
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "QE_CAPTURE_THRESHOLD",
        "QE_DATA_DIR",
        "QE_DUCKDB_PATH",
        "QE_EVAL_MARGIN",
        "QE_EVAL_MIN_ITEMS",
        "QE_FINETUNE_ALLOW_NAIVE",
        "QE_FINETUNE_BACKEND",
        "QE_FINETUNE_BASE_MODEL",
        "QE_FINETUNE_METHOD",
        "QE_FINETUNE_THRESHOLD",
        "QE_LLM_MODEL",
        "QE_MAX_QUEUE_AGE",
        "QE_MIN_CONFIDENCE",
        "QE_QUEUE_URL",
        "QE_ROLLOUT",
    }
)
