"""Human review: spot checks, the review backlog and the judge's calibration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import _bool, _duration, _float, _int

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "spot_check_share": ("QE_SPOT_CHECK_SHARE", _float("QE_SPOT_CHECK_SHARE")),
    "max_review_age_seconds": ("QE_MAX_REVIEW_AGE", _duration("QE_MAX_REVIEW_AGE")),
    "max_review_backlog": ("QE_MAX_REVIEW_BACKLOG", _int("QE_MAX_REVIEW_BACKLOG")),
    "llm_propose_review": ("QE_LLM_PROPOSE_REVIEW", _bool("QE_LLM_PROPOSE_REVIEW")),
    "judge_min_agreement": ("QE_JUDGE_MIN_AGREEMENT", _float("QE_JUDGE_MIN_AGREEMENT")),
    "judge_min_decisions": ("QE_JUDGE_MIN_DECISIONS", _int("QE_JUDGE_MIN_DECISIONS")),
    "judge_agreement_window": ("QE_JUDGE_AGREEMENT_WINDOW", _int("QE_JUDGE_AGREEMENT_WINDOW")),
}


class ReviewSettings(BaseModel):
    """Human review: spot checks, the review backlog and the judge's calibration."""

    model_config = ConfigDict(frozen=True)

    spot_check_share: float = Field(
        0.02, description="Share of `train` samples held for a human spot check (deterministic)."
    )
    max_review_age_seconds: float = Field(
        86_400.0,
        description="`review_backlog_age` warns "
        "when the oldest pending review is older (default 24h).",
    )
    max_review_backlog: int = Field(
        1_000, description="`review_backlog_size` warns when more samples wait for review."
    )
    llm_propose_review: bool = Field(
        True,
        description="LLM mode: review samples get a `proposed` completion a reviewer can accept.",
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
