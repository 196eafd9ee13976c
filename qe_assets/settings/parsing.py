"""Parsers of the QE_* variables and the types and constants settings share."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    route_base_url,
)
from qe_assets.service.config import number as _number

FinetuneBackend = Literal["none", "openai", "command"]
FINETUNE_BACKENDS: tuple[str, ...] = get_args(FinetuneBackend)
# sft: the chat/record files; dpo: the preference pairs (chosen = correction, rejected = original).
FinetuneMethod = Literal["sft", "dpo"]
FINETUNE_METHODS: tuple[str, ...] = get_args(FinetuneMethod)
INSTRUCTION_LANGUAGES = ("auto", "zh", "en")
# direct: the evaluation gate promotes; canary: it starts an A/B test at the ramp's first share.
ROLLOUT_MODES = ("direct", "canary")
EVAL_JUDGES = ("llm", "reference")
MODEL_SERVERS = ("none", "external", "transformers", "vllm")


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


def _string_map(name: str, meaning: str, rule: str) -> Callable[[str], dict[str, str]]:
    """A JSON object whose values are non-empty strings; `meaning` says what maps to what."""

    def parse(raw: str) -> dict[str, str]:
        value = _json_object(name)(raw)
        bad = [k for k, v in value.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise SettingsError(
                f"{name} must map {meaning} (non-empty strings); {bad[0]!r} does not"
            )
        return value

    return _ruled(parse, rule)


_model_map = _string_map(
    "QE_EVAL_MODEL_MAP",
    "model ids to served model names",
    "JSON object of model id → served name (non-empty strings)",
)


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
_ruled(route_base_url, "`http://` or `https://` base URL")


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


# QE_FINETUNE_K8S: where the `command` backend trains as a Kubernetes pod (finetune/k8s.py).
class K8sTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str
    namespace: str = "default"
    gpus: int = Field(1, ge=0)
    data_claim: str | None = None
    data_path: str | None = None
    node_selector: dict[str, str] = {}
    service_account: str | None = None
    env: dict[str, str] = {}


def parse_target(raw: dict[str, Any] | None) -> K8sTarget | None:
    """The pod target of QE_FINETUNE_K8S, or None when unset; a bad one fails naming the key."""
    if not raw:
        return None
    try:
        return K8sTarget(**raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "value"
        raise SettingsError(f"QE_FINETUNE_K8S.{where}: {error['msg']}") from None
