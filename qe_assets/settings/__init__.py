"""Typed settings, checked when the definitions load: one module per part of the loop
(`settings/<part>.py`, each its fields and their QE_* variables), composed here into `Settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from qe_assets.settings.annotate import ENVIRONMENT as _ANNOTATE_ENV
from qe_assets.settings.annotate import AnnotateSettings
from qe_assets.settings.evaluation import ENVIRONMENT as _EVALUATION_ENV
from qe_assets.settings.evaluation import EvaluationSettings
from qe_assets.settings.finetune import ENVIRONMENT as _FINETUNE_ENV
from qe_assets.settings.finetune import FinetuneSettings, vllm_unavailable
from qe_assets.settings.imports import ENVIRONMENT as _IMPORTS_ENV
from qe_assets.settings.imports import ImportSettings
from qe_assets.settings.ingest import ENVIRONMENT as _INGEST_ENV
from qe_assets.settings.ingest import IngestSettings
from qe_assets.settings.ops import ENVIRONMENT as _OPS_ENV
from qe_assets.settings.ops import OpsSettings
from qe_assets.settings.parsing import (  # noqa: F401 (re-exported: used across the package)
    REDIS_LIST,
    FinetuneBackend,
    FinetuneMethod,
    K8sTarget,
    SettingsError,
    estimated_cost,
    finetune_backend_problem,
    kafka_environment,
    parse_duration,
    parse_kafka_url,
    parse_target,
)
from qe_assets.settings.release import ENVIRONMENT as _RELEASE_ENV
from qe_assets.settings.release import ReleaseSettings
from qe_assets.settings.review import ENVIRONMENT as _REVIEW_ENV
from qe_assets.settings.review import ReviewSettings
from qe_assets.settings.rollout import ENVIRONMENT as _ROLLOUT_ENV
from qe_assets.settings.rollout import RolloutSettings
from qe_assets.settings.serve import ENVIRONMENT as _SERVE_ENV
from qe_assets.settings.serve import ServeSettings
from qe_assets.settings.store import ENVIRONMENT as _STORE_ENV
from qe_assets.settings.store import StoreSettings

# field name → (environment variable, parser), every part's, in the reference's order.
ENVIRONMENT = {
    **_STORE_ENV,
    **_INGEST_ENV,
    **_ANNOTATE_ENV,
    **_REVIEW_ENV,
    **_RELEASE_ENV,
    **_FINETUNE_ENV,
    **_EVALUATION_ENV,
    **_ROLLOUT_ENV,
    **_SERVE_ENV,
    **_OPS_ENV,
    **_IMPORTS_ENV,
}


class Settings(
    ImportSettings,
    OpsSettings,
    ServeSettings,
    RolloutSettings,
    EvaluationSettings,
    FinetuneSettings,
    ReleaseSettings,
    ReviewSettings,
    AnnotateSettings,
    IngestSettings,
    StoreSettings,
):
    """Typed view of the `QE_*` environment; defaults follow CONTRACT §2.

    The pipeline's settings (the RAG service reads its own few in `qe_assets.service.config`);
    the Dagster resource `PipelineSettings` inherits these fields, so the launchpad shows them."""

    model_config = ConfigDict(frozen=True)

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
        if settings.finetune_k8s:
            parse_target(settings.finetune_k8s)
        if settings.model_server == "external" and not settings.model_server_url:
            raise SettingsError(
                "QE_MODEL_SERVER=external needs QE_MODEL_SERVER_URL, the OpenAI-compatible URL of "
                "your vLLM / SGLang / Ollama / llama.cpp server (e.g. http://127.0.0.1:8000/v1)"
            )
        if settings.model_server == "vllm" and (problem := vllm_unavailable(env)):
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
    "QE_EVAL_JUDGE_API_KEY": (
        "`OPENAI_API_KEY`",
        "The key of the judge's endpoint (`QE_EVAL_JUDGE_BASE_URL`). Read when the evaluation "
        "runs, never a setting, never logged.",
    ),
    "QE_PHOENIX_API_KEY": (
        "unset",
        "The key `qe import phoenix` sends as a bearer token (a Phoenix with authentication). "
        "Read when the importer connects; never a setting, never logged.",
    ),
    "QE_LANGFUSE_PUBLIC_KEY": (
        "required by `qe import langfuse`",
        "Langfuse's public key (basic-auth user). Never a setting, never logged.",
    ),
    "QE_LANGFUSE_SECRET_KEY": (
        "required by `qe import langfuse`",
        "Langfuse's secret key (basic-auth password). Never a setting, never logged.",
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
    "QE_TEST_PHOENIX": (
        "unset (the Phoenix tests skip)",
        "Tests and `make bench`: the `phoenix` executable of `.venv-phoenix` (`make phoenix`); "
        "`make test` sets it, and the tests start a real Phoenix server with it.",
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
