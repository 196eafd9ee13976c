"""Where the evaluation asks its questions: the models on one endpoint, the judge on its own.

The candidate and the baseline are answered where they are served (QE_EVAL_BASE_URL, else
OPENAI_BASE_URL). The LLM judge is asked at QE_EVAL_JUDGE_BASE_URL with QE_EVAL_JUDGE_API_KEY,
each falling back to the LLM's own settings (OPENAI_BASE_URL, OPENAI_API_KEY): a hosted judge can
judge a model served on this machine, which serves no judge.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from qe_assets.evaluation.reference_judge import REFERENCE_JUDGE, reference_reply
from qe_assets.lib.resources import OpenAIResource
from qe_assets.settings import Settings

JUDGE_KEY_VARIABLE = "QE_EVAL_JUDGE_API_KEY"


def models_endpoint(
    openai: OpenAIResource, settings: Settings, served_url: str | None = None
) -> OpenAIResource:
    """The endpoint that serves the candidate and the baseline: QE_EVAL_BASE_URL, else the
    model server's (`served_url`: QE_MODEL_SERVER), else the LLM's."""
    return _endpoint(
        openai, openai.api_key, settings.eval_base_url or served_url or openai.base_url
    )


def judge_endpoint(openai: OpenAIResource, settings: Settings) -> OpenAIResource:
    """The LLM judge's endpoint. The key is read from the environment when the run starts and
    only handed to the client: never a setting, never in a log or a table."""
    key = os.environ.get(JUDGE_KEY_VARIABLE) or openai.api_key
    return _endpoint(openai, key, settings.eval_judge_base_url or openai.base_url)


def _endpoint(openai: OpenAIResource, key: str | None, base_url: str | None) -> OpenAIResource:
    return OpenAIResource(
        api_key=key,
        base_url=base_url,
        timeout_seconds=openai.timeout_seconds,
        max_retries=openai.max_retries,
    )


def judge_model(settings: Settings) -> str | None:
    """The judge recorded with every verdict: the reference judge's name, else the LLM judge."""
    if settings.eval_judge == "reference":
        return REFERENCE_JUDGE
    return settings.eval_judge_model or settings.llm_judge_model or settings.llm_model


def local_judge(settings: Settings) -> Callable[[dict[str, Any]], str | None] | None:
    """The judge computed here, when QE_EVAL_JUDGE=reference; None for an LLM judge."""
    return reference_reply if settings.eval_judge == "reference" else None
