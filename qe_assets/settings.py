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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from qe_assets.evaluation.sequential import Policy

FINETUNE_BACKENDS = ("none", "openai", "command")
# sft: the chat/record files; dpo: the preference pairs (chosen = correction, rejected = original).
FINETUNE_METHODS = ("sft", "dpo")
INSTRUCTION_LANGUAGES = ("auto", "zh", "en")
# direct: the evaluation gate promotes; canary: it starts an A/B test at the ramp's first share.
ROLLOUT_MODES = ("direct", "canary")
REDIS_LIST = "quality_events"


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def _number(name: str, raw: str, *, lo: float | None, hi: float | None, integer: bool) -> Any:
    kind = "an integer" if integer else "a number"
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise SettingsError(f"{name} must be {kind} {bounds}, got {raw!r}")
    return value


def _float(name: str, lo: float | None = 0.0, hi: float | None = 1.0) -> Callable[[str], Any]:
    return lambda raw: _number(name, raw, lo=lo, hi=hi, integer=False)


def _int(name: str, lo: int = 1) -> Callable[[str], Any]:
    return lambda raw: _number(name, raw, lo=lo, hi=None, integer=True)


def _choice(name: str, options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)}; got {raw!r}")
        return value

    return parse


def _bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

    return parse


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

    return parse


def _json_object(name: str) -> Callable[[str], dict[str, Any]]:
    def parse(raw: str) -> dict[str, Any]:
        try:
            value = json.loads(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a JSON object, got {raw!r}") from None
        if not isinstance(value, dict):
            raise SettingsError(f"{name} must be a JSON object, got {raw!r}")
        return value

    return parse


def _model_map(raw: str) -> dict[str, str]:
    value = _json_object("QE_EVAL_MODEL_MAP")(raw)
    bad = [key for key, name in value.items() if not isinstance(name, str) or not name.strip()]
    if bad:
        raise SettingsError(
            f"QE_EVAL_MODEL_MAP must map model ids to served model names (non-empty strings); "
            f"{bad[0]!r} does not"
        )
    return value


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


def _memory_size(raw: str) -> str:
    value = raw.strip().replace(" ", "")
    if not re.fullmatch(r"\d+(\.\d+)?([KMGT]i?B|%)", value, flags=re.IGNORECASE):
        raise SettingsError(
            f"QE_DUCKDB_MEMORY_LIMIT must be a size such as 512MB, 2GB or 4GiB, or a share of "
            f"the machine's memory such as 25%; got {raw!r}"
        )
    return value


KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
KAFKA_HOST = re.compile(r"[^\s:@/]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}")
KAFKA_ENV_PREFIX = "QE_KAFKA_"


@dataclass(frozen=True)
class KafkaTarget:
    """Where a `kafka://` QE_QUEUE_URL points, and the librdkafka properties it carries."""

    bootstrap_servers: str
    topic: str
    common: dict[str, str]
    producer: dict[str, str]
    consumer: dict[str, str]


def parse_kafka_url(raw: str) -> KafkaTarget:
    """`kafka://HOST:PORT[,HOST:PORT…][/TOPIC][?librdkafka.property=value…]`.

    Query properties go to both clients, or to one of them with a `producer.` / `consumer.`
    prefix. Secrets never go into the URL (it is part of the run config the UI shows): they come
    from `QE_KAFKA_*` variables, read when the client is built (see `kafka_environment`).
    """
    parts = urlsplit(raw.strip())
    hosts = [h.strip() for h in parts.netloc.split(",") if h.strip()]
    problem = None
    if parts.scheme != "kafka" or not hosts:
        problem = "it needs at least one HOST:PORT"
    elif bad := [h for h in hosts if not KAFKA_HOST.fullmatch(h)]:
        problem = f"{bad[0]!r} is not HOST:PORT"
    topic = parts.path.strip("/") or REDIS_LIST
    if problem is None and not KAFKA_TOPIC.fullmatch(topic):
        problem = f"topic {topic!r} may hold only letters, digits, '.', '_' and '-'"
    common: dict[str, str] = {}
    roles: dict[str, dict[str, str]] = {"producer": {}, "consumer": {}}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        role, _, name = key.partition(".")
        target, name = (roles[role], name) if role in roles and name else (common, key)
        if any(word in name for word in ("password", "secret", "key")):
            problem = problem or (
                f"{key} must not be in the URL (the UI shows it); set "
                f"{KAFKA_ENV_PREFIX}{name.upper().replace('.', '_')} instead"
            )
        target[name] = value
    if problem:
        raise SettingsError(
            f"QE_QUEUE_URL must look like kafka://HOST:PORT[,HOST:PORT]/TOPIC: {problem}; "
            f"got {raw!r}"
        )
    return KafkaTarget(",".join(hosts), topic, common, roles["producer"], roles["consumer"])


def kafka_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka properties from `QE_KAFKA_SASL_PASSWORD`-style variables (`sasl.password`),
    for what must not be in QE_QUEUE_URL; read when a client is built, never stored in
    settings."""
    env = os.environ if environ is None else environ
    return {
        name[len(KAFKA_ENV_PREFIX) :].lower().replace("_", "."): value
        for name, value in env.items()
        if name.startswith(KAFKA_ENV_PREFIX) and value
    }


def _serve_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise SettingsError(
            f"QE_SERVE_URL must be the base URL of `qe serve`, such as http://127.0.0.1:8787; "
            f"got {raw!r}"
        )
    return value


def _queue_url(raw: str) -> str:
    value = raw.strip()
    if value.startswith("kafka://"):
        parse_kafka_url(value)
        if importlib.util.find_spec("confluent_kafka") is None:
            raise SettingsError(
                "QE_QUEUE_URL=kafka://… needs the Kafka client: pip install 'qe_assets[kafka]'"
            )
        return value
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(
            f"QE_QUEUE_URL must look like redis://HOST:PORT/DB or kafka://HOST:PORT/TOPIC (or "
            f"leave it unset for the file inbox); got {raw!r}"
        )
    return value


# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "data_dir": ("QE_DATA_DIR", str.strip),
    "duckdb_path": ("QE_DUCKDB_PATH", str.strip),
    "duckdb_memory_limit": ("QE_DUCKDB_MEMORY_LIMIT", _memory_size),
    "queue_url": ("QE_QUEUE_URL", _queue_url),
    "queue_consumer": ("QE_QUEUE_CONSUMER", str.strip),
    "capture_threshold": ("QE_CAPTURE_THRESHOLD", _float("QE_CAPTURE_THRESHOLD")),
    "count_flush_seconds": (
        "QE_COUNT_FLUSH_SECONDS",
        _float("QE_COUNT_FLUSH_SECONDS", 0.05, 3600.0),
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
    "finetune_base_model": ("QE_FINETUNE_BASE_MODEL", str.strip),
    "finetune_suffix": ("QE_FINETUNE_SUFFIX", str.strip),
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
    "finetune_command": ("QE_FINETUNE_COMMAND", str.strip),
    "finetune_method": ("QE_FINETUNE_METHOD", _choice("QE_FINETUNE_METHOD", FINETUNE_METHODS)),
    "finetune_poll_seconds": (
        "QE_FINETUNE_POLL_SECONDS",
        _float("QE_FINETUNE_POLL_SECONDS", 0.0, None),
    ),
    "finetune_deadline_seconds": (
        "QE_FINETUNE_DEADLINE_SECONDS",
        _float("QE_FINETUNE_DEADLINE_SECONDS", 0.0, None),
    ),
    "llm_model": ("QE_LLM_MODEL", str.strip),
    "openai_base_url": ("OPENAI_BASE_URL", str.strip),
    "llm_concurrency": ("QE_LLM_CONCURRENCY", _int("QE_LLM_CONCURRENCY")),
    "llm_batch_size": ("QE_LLM_BATCH_SIZE", _int("QE_LLM_BATCH_SIZE")),
    "llm_timeout_seconds": ("QE_LLM_TIMEOUT_SECONDS", _float("QE_LLM_TIMEOUT_SECONDS", 0.0, None)),
    "llm_max_retries": ("QE_LLM_MAX_RETRIES", _int("QE_LLM_MAX_RETRIES", 0)),
    "llm_temperature": ("QE_LLM_TEMPERATURE", _float("QE_LLM_TEMPERATURE", 0.0, 2.0)),
    "llm_max_tokens": ("QE_LLM_MAX_TOKENS", _int("QE_LLM_MAX_TOKENS")),
    "llm_judge": ("QE_LLM_JUDGE", _bool("QE_LLM_JUDGE")),
    "llm_judge_model": ("QE_LLM_JUDGE_MODEL", str.strip),
    "llm_judge_margin": ("QE_LLM_JUDGE_MARGIN", _float("QE_LLM_JUDGE_MARGIN", 0.0, 10.0)),
    "judge_min_agreement": ("QE_JUDGE_MIN_AGREEMENT", _float("QE_JUDGE_MIN_AGREEMENT")),
    "judge_min_decisions": ("QE_JUDGE_MIN_DECISIONS", _int("QE_JUDGE_MIN_DECISIONS")),
    "judge_agreement_window": ("QE_JUDGE_AGREEMENT_WINDOW", _int("QE_JUDGE_AGREEMENT_WINDOW")),
    "serve_url": ("QE_SERVE_URL", _serve_url),
    "llm_propose_review": ("QE_LLM_PROPOSE_REVIEW", _bool("QE_LLM_PROPOSE_REVIEW")),
    "eval_share": ("QE_EVAL_SHARE", _float("QE_EVAL_SHARE", 0.0, 0.5)),
    "eval_min_items": ("QE_EVAL_MIN_ITEMS", _int("QE_EVAL_MIN_ITEMS")),
    "eval_margin": ("QE_EVAL_MARGIN", _float("QE_EVAL_MARGIN", 0.0, 0.5)),
    "eval_base_url": ("QE_EVAL_BASE_URL", str.strip),
    "eval_model_map": ("QE_EVAL_MODEL_MAP", _model_map),
    "eval_judge_model": ("QE_EVAL_JUDGE_MODEL", str.strip),
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

    data_dir: str = "data"
    duckdb_path: str | None = None
    # DuckDB's default (80 % of RAM) lets its page cache grow with history; a bound keeps a run's
    # memory flat, and larger-than-memory work spills to disk.
    duckdb_memory_limit: str = "1GB"
    queue_url: str | None = None
    queue_consumer: str = "default"
    capture_threshold: float = 0.7
    # How often a producer process sends its per-model answer counts (docs/rollout.md).
    count_flush_seconds: float = 5.0
    ingest_batch_size: int = 5_000
    min_confidence: float = 0.6
    confidence_factor: float = 1.5
    context_top_k: int = 3
    context_max_chars: int = 500
    instruction_language: str = "auto"
    validation_share: float = 0.1
    spot_check_share: float = 0.02
    chat_system_message: bool = True
    chat_weight_threshold: float | None = None
    export_batch_size: int = 10_000
    pii_redaction: bool = True
    max_label_share: float = 0.8
    max_unspecified_share: float = 0.2
    max_unknown_label_share: float = 0.1
    max_label_drift: float = 0.3
    min_dataset_examples: int = 10
    finetune_threshold: int = 1000
    finetune_backend: str = "none"
    finetune_base_model: str = "gpt-4o-mini-2024-07-18"
    finetune_suffix: str = "qe"
    # The loop runs by itself under `make ui`: both sensors start running (set false to stop).
    finetune_sensor_running: bool = True
    finetune_allow_naive: bool = False
    queue_sensor_running: bool = True
    sensor_interval_seconds: int = 30
    max_queue_age_seconds: float = 3_600.0
    max_review_age_seconds: float = 86_400.0
    max_review_backlog: int = 1_000
    max_reject_share: float = 0.2
    finetune_hyperparameters: dict[str, Any] = {}
    finetune_command: str | None = None
    finetune_method: str = "sft"
    finetune_poll_seconds: float = 30.0
    finetune_deadline_seconds: float = 4 * 3600.0
    llm_model: str | None = None
    openai_base_url: str | None = None
    llm_concurrency: int = 16
    llm_batch_size: int = 200
    llm_timeout_seconds: float = 60.0
    llm_max_retries: int = 4
    llm_temperature: float = 0.2
    llm_max_tokens: int = 1024
    llm_judge: bool = False
    llm_judge_model: str | None = None
    llm_judge_margin: float = 1.0
    # LLM mode: review samples get a `proposed` completion a reviewer can accept (docs/review.md).
    llm_propose_review: bool = True
    llm_price_input_per_1m: float = 0.0
    llm_price_output_per_1m: float = 0.0
    # The judge measured against reviewers (docs/judge-calibration.md): below this agreement over
    # the last `judge_agreement_window` decisions (once there are `judge_min_decisions`), the
    # judge's approvals wait for a person instead of going straight into versions.
    judge_min_agreement: float = 0.8
    judge_min_decisions: int = 30
    judge_agreement_window: int = 200
    # Where `qe serve` answers: the dashboards linked from the assets' metadata.
    serve_url: str = "http://127.0.0.1:8787"
    # The evaluation gate (docs/evaluation.md): the share of questions held out for the frozen
    # evaluation set; they never reach a training file. 5 % gives the gate its 50 items once about
    # 1,000 samples were released; 0 holds nothing out (the gate then has nothing to judge).
    eval_share: float = 0.05
    eval_min_items: int = 50
    eval_margin: float = 0.0
    eval_base_url: str | None = None  # None: OPENAI_BASE_URL
    eval_model_map: dict[str, str] = {}  # model id → name the endpoint serves it under
    eval_judge_model: str | None = None  # None: QE_LLM_JUDGE_MODEL, else QE_LLM_MODEL
    eval_icl_examples: int = 0  # k train examples in an ICL baseline's prompt; 0: no ICL baseline
    # The A/B rollout (docs/rollout.md): canary makes a gate-passed candidate an A/B test.
    rollout_mode: str = "direct"
    ab_ramp: list[float] = [0.05, 0.25, 0.5]  # the candidate's traffic shares, in turn
    ab_alpha: float = 0.05  # P(ever promoting an equal candidate) ≤ this
    ab_tau: float = 0.05  # the difference of low-score rates the mSPRT is tuned to find
    ab_min_answers: int = 200  # per arm before deciding; at a share before ramping on
    ab_ramp_max_harm: float = 0.01  # ramp only while candidate rate − production rate ≤ this

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
