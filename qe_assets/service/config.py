"""The few settings the service side reads, and nothing else from the environment.

A RAG service imports `capture` and `choose_model` and keeps serving whatever the rest of the
`QE_*` environment says: the pipeline's settings (`qe_assets.settings`) fail at load naming the
variable, which is right for a Dagster run and wrong for a request path. So the service reads
only its six variables here, and a bad value of one of them is a logged warning (once per
value) and its default, never an exception:

| variable | used for | a bad value gives |
|---|---|---|
| `QE_DATA_DIR` | the inbox (queue or spool) and `rollout.json` | — (any path) |
| `QE_QUEUE_URL` | where events go | the file inbox, which the ingester always drains |
| `QE_CAPTURE_THRESHOLD` | which scores are sent | 0.7 |
| `QE_COUNT_FLUSH_SECONDS` | how often answer counts are sent | 5 s |
| `QE_FINETUNE_BASE_MODEL` | production while no `rollout.json` names one | — (any name) |
| `QE_ROUTE_BASE_URL` | the base URL `choose` gives a model `rollout.json` has none for | none |

The pipeline's settings parse the same variables with the same rules (`number`, `queue_url`,
`parse_kafka_url` live here and `qe_assets.settings` uses them), so both sides agree on what
is valid; only what happens to an invalid value differs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("qe_assets.service")

REDIS_LIST = "quality_events"
DEFAULT_DATA_DIR = "data"
DEFAULT_CAPTURE_THRESHOLD = 0.7
DEFAULT_COUNT_FLUSH_SECONDS = 5.0
COUNT_FLUSH_BOUNDS = (0.05, 3600.0)
DEFAULT_BASE_MODEL = "gpt-4o-mini-2024-07-18"

KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
KAFKA_HOST = re.compile(r"[^\s:@/]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}")
KAFKA_ENV_PREFIX = "QE_KAFKA_"


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def number(name: str, raw: str, *, lo: float | None, hi: float | None, integer: bool) -> Any:
    """`raw` as a finite number within [lo, hi]; SettingsError naming `name` otherwise."""
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


def queue_url(raw: str) -> str:
    """QE_QUEUE_URL checked: a Redis or Kafka URL whose client is installed; SettingsError
    naming the variable otherwise."""
    value = raw.strip()
    if value.startswith("kafka://"):
        parse_kafka_url(value)
        if importlib.util.find_spec("confluent_kafka") is None:
            raise SettingsError(
                "QE_QUEUE_URL=kafka://… needs the Kafka client: pip install 'qe_assets[kafka]' "
                "(or 'qe-capture[kafka]')"
            )
        return value
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(
            f"QE_QUEUE_URL must look like redis://HOST:PORT/DB or kafka://HOST:PORT/TOPIC (or "
            f"leave it unset for the file inbox); got {raw!r}"
        )
    if importlib.util.find_spec("redis") is None:
        raise SettingsError(
            "QE_QUEUE_URL=redis://… needs the Redis client: pip install 'qe-capture[redis]'"
        )
    return value


def route_base_url(raw: str) -> str:
    """QE_ROUTE_BASE_URL checked: an http(s) URL."""
    value = raw.strip()
    if not value.startswith(("http://", "https://")) or " " in value:
        raise SettingsError(
            f"QE_ROUTE_BASE_URL must be an http(s) URL like http://127.0.0.1:8000/v1, got {raw!r}"
        )
    return value


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_once(key: tuple[str, str], message: str, *args: Any) -> None:
    """Log `message` as a warning the first time `key` is seen in this process: a bad setting is
    worth one line, not one per request."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def _read(env: Mapping[str, str], variable: str, parse: Any, default: Any, effect: str) -> Any:
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        return parse(raw)
    except SettingsError as exc:
        warn_once((variable, raw), "%s; the service %s", exc, effect)
        return default


@dataclass(frozen=True)
class ServiceSettings:
    """What `capture` and `choose_model` need; `from_env` never raises."""

    data_dir: str = DEFAULT_DATA_DIR
    queue_url: str | None = None
    capture_threshold: float = DEFAULT_CAPTURE_THRESHOLD
    count_flush_seconds: float = DEFAULT_COUNT_FLUSH_SECONDS
    finetune_base_model: str = DEFAULT_BASE_MODEL
    route_base_url: str | None = None

    @property
    def inbox_dir(self) -> Path:
        return Path(self.data_dir) / "inbox"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """The service's variables from the environment; a bad value is a warning (once) and
        the default."""
        env = os.environ if environ is None else environ
        lo, hi = COUNT_FLUSH_BOUNDS
        return cls(
            data_dir=_read(env, "QE_DATA_DIR", str.strip, DEFAULT_DATA_DIR, ""),
            queue_url=_read(
                env, "QE_QUEUE_URL", queue_url, None, "sends events to the file inbox instead"
            ),
            capture_threshold=_read(
                env,
                "QE_CAPTURE_THRESHOLD",
                lambda raw: number("QE_CAPTURE_THRESHOLD", raw, lo=0.0, hi=1.0, integer=False),
                DEFAULT_CAPTURE_THRESHOLD,
                f"uses {DEFAULT_CAPTURE_THRESHOLD}",
            ),
            count_flush_seconds=_read(
                env,
                "QE_COUNT_FLUSH_SECONDS",
                lambda raw: number("QE_COUNT_FLUSH_SECONDS", raw, lo=lo, hi=hi, integer=False),
                DEFAULT_COUNT_FLUSH_SECONDS,
                f"uses {DEFAULT_COUNT_FLUSH_SECONDS:g}",
            ),
            finetune_base_model=_read(
                env, "QE_FINETUNE_BASE_MODEL", str.strip, DEFAULT_BASE_MODEL, ""
            ),
            route_base_url=_read(
                env, "QE_ROUTE_BASE_URL", route_base_url, None, "gives no base URL instead"
            ),
        )

    @classmethod
    def of(cls, settings: Any) -> ServiceSettings:
        """The service's part of a settings object with these fields (the pipeline's
        `Settings`, or a `ServiceSettings` itself)."""
        if isinstance(settings, ServiceSettings):
            return settings
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})
