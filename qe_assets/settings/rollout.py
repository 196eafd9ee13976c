"""Rollout: direct or canary, and the A/B test's knobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qe_assets.settings.parsing import (
    ROLLOUT_MODES,
    _choice,
    _float,
    _int,
    _ramp,
    route_base_url,
)

# field name → (environment variable, parser). Defaults live on the model below.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "rollout_mode": ("QE_ROLLOUT", _choice("QE_ROLLOUT", ROLLOUT_MODES)),
    "ab_ramp": ("QE_AB_RAMP", _ramp),
    "ab_alpha": ("QE_AB_ALPHA", _float("QE_AB_ALPHA", 0.001, 0.5)),
    "ab_tau": ("QE_AB_TAU", _float("QE_AB_TAU", 0.001, 1.0)),
    "ab_min_answers": ("QE_AB_MIN_ANSWERS", _int("QE_AB_MIN_ANSWERS")),
    "ab_ramp_max_harm": ("QE_AB_RAMP_MAX_HARM", _float("QE_AB_RAMP_MAX_HARM", 0.0, 1.0)),
    "route_base_url": ("QE_ROUTE_BASE_URL", route_base_url),
}


class RolloutSettings(BaseModel):
    """Rollout: direct or canary, and the A/B test's knobs."""

    model_config = ConfigDict(frozen=True)

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
    route_base_url: str | None = Field(
        None,
        description=(
            "The OpenAI-compatible base URL `qe_assets.service.choose` gives for a model that "
            "`rollout.json` names no server for (one not served by `QE_MODEL_SERVER`); unset: "
            "none, i.e. the openai client's own default (`OPENAI_BASE_URL`)."
        ),
    )
