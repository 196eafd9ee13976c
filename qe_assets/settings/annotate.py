"""Annotation and completions: labels, context, instructions, the LLM, the judge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import INSTRUCTION_LANGUAGES, _bool, _choice, _float, _int, _text

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "min_confidence": ("QE_MIN_CONFIDENCE", _float("QE_MIN_CONFIDENCE")),
    "confidence_factor": ("QE_CONFIDENCE_FACTOR", _float("QE_CONFIDENCE_FACTOR", 0.0, None)),
    "context_top_k": ("QE_CONTEXT_TOP_K", _int("QE_CONTEXT_TOP_K")),
    "context_max_chars": ("QE_CONTEXT_MAX_CHARS", _int("QE_CONTEXT_MAX_CHARS")),
    "instruction_language": (
        "QE_INSTRUCTION_LANGUAGE",
        _choice("QE_INSTRUCTION_LANGUAGE", INSTRUCTION_LANGUAGES),
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
    "llm_price_input_per_1m": (
        "QE_LLM_PRICE_INPUT_PER_1M",
        _float("QE_LLM_PRICE_INPUT_PER_1M", 0.0, None),
    ),
    "llm_price_output_per_1m": (
        "QE_LLM_PRICE_OUTPUT_PER_1M",
        _float("QE_LLM_PRICE_OUTPUT_PER_1M", 0.0, None),
    ),
}


class AnnotateSettings(BaseModel):
    """Annotation and completions: labels, context, instructions, the LLM, the judge."""

    model_config = ConfigDict(frozen=True)

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
    llm_price_input_per_1m: float = Field(
        0.0, description="Price per million prompt tokens, for the cost estimate."
    )
    llm_price_output_per_1m: float = Field(
        0.0, description="Price per million completion tokens, for the cost estimate."
    )
