"""The evaluation gate: held-out share, judge, models and margins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import EVAL_JUDGES, _choice, _float, _int, _model_map, _text

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
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
    "eval_judge": ("QE_EVAL_JUDGE", _choice("QE_EVAL_JUDGE", EVAL_JUDGES)),
    "eval_judge_base_url": ("QE_EVAL_JUDGE_BASE_URL", _text),
    "eval_icl_examples": ("QE_EVAL_ICL_EXAMPLES", _int("QE_EVAL_ICL_EXAMPLES", 0)),
}


class EvaluationSettings(BaseModel):
    """The evaluation gate: held-out share, judge, models and margins."""

    model_config = ConfigDict(frozen=True)

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
    eval_judge: str = Field(
        "llm",
        description="`llm`: a model compares each pair (QE_EVAL_JUDGE_MODEL); `reference`: "
        "token-F1 against the reference answer, computed here (offline, deterministic).",
    )
    eval_judge_base_url: str | None = Field(
        None,
        description="Where the LLM judge is asked (key: `QE_EVAL_JUDGE_API_KEY`); unset: "
        "`OPENAI_BASE_URL`, so a hosted judge can sit next to a local candidate.",
    )
    eval_icl_examples: int = Field(
        0,
        description="k > 0 also compares the candidate with "
        "production given k train examples in its prompt (reported, not gating).",
    )
