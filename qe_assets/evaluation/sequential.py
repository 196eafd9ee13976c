"""The A/B test's statistics: an mSPRT on the difference of two low-score rates (pure Python).

Why an mSPRT (Johari, Pekelis, Walsh: "Always valid inference", 2017): `ab_test` looks at the
data after every run, and a fixed-n z-test read that often promotes an equal candidate far more
often than its nominal 5 %. The mixture sequential probability ratio test keeps
P(ever rejecting an equal candidate) ≤ alpha however often it is read, which is exactly the
false-promotion guarantee we want (a Bayesian posterior with a threshold gives no such bound).

With d = rate_candidate − rate_production, its variance V under H0 (pooled rate p̄:
V = p̄(1 − p̄)(1/n_c + 1/n_p)), and a normal mixture N(0, tau²) over the true difference, the
mixture likelihood ratio is

    Λ = sqrt(V / (V + tau²)) · exp(d² tau² / (2 V (V + tau²)))

and H0 (equal rates) is rejected once Λ ≥ 1/alpha: promote when d < 0 (fewer low-score answers),
roll back when d > 0. tau is the size of difference the test is tuned to find fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"


@dataclass(frozen=True)
class Arms:
    """Answers and low-score answers of production and candidate over the test so far."""

    answers_production: int
    low_production: int
    answers_candidate: int
    low_candidate: int

    @property
    def rate_production(self) -> float | None:
        return self.low_production / self.answers_production if self.answers_production else None

    @property
    def rate_candidate(self) -> float | None:
        return self.low_candidate / self.answers_candidate if self.answers_candidate else None


@dataclass(frozen=True)
class Policy:
    """The test's knobs (QE_AB_* settings)."""

    alpha: float = 0.05
    tau: float = 0.05
    min_answers: int = 200
    ramp: tuple[float, ...] = (0.05, 0.25, 0.5)
    ramp_max_harm: float = 0.01


@dataclass(frozen=True)
class Decision:
    decision: str  # promote | rollback | continue
    share: float  # the candidate's share after it (0 after a rollback, unchanged on promote)
    statistic: float  # the mixture likelihood ratio Λ
    difference: float | None  # rate_candidate − rate_production
    reason: str

    @property
    def harmful(self) -> bool:
        """The candidate's low-score rate is significantly worse."""
        return self.decision == ROLLBACK


def mixture_ratio(arms: Arms, tau: float) -> tuple[float, float | None]:
    """(Λ, d): the mSPRT's mixture likelihood ratio and the observed difference of rates."""
    n_c, n_p = arms.answers_candidate, arms.answers_production
    if n_c == 0 or n_p == 0:
        return 1.0, None
    d = arms.low_candidate / n_c - arms.low_production / n_p
    pooled = (arms.low_candidate + arms.low_production) / (n_c + n_p)
    variance = pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_p)
    if variance <= 0.0:  # every answer low, or none: no evidence either way
        return 1.0, d
    t2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + t2)) + d * d * t2 / (
        2.0 * variance * (variance + t2)
    )
    return math.exp(min(log_ratio, 700.0)), d


def next_share(share: float, ramp: tuple[float, ...]) -> float:
    """The ramp's next step above `share` (the same share at the top)."""
    return next((step for step in ramp if step > share + 1e-12), share)


def decide(arms: Arms, share: float, answers_at_share: int, policy: Policy) -> Decision:
    """The decision after one look. `answers_at_share`: the candidate's answers when its share
    last changed (the ramp moves on after `min_answers` more at the current share)."""
    ratio, d = mixture_ratio(arms, policy.tau)
    bound = 1.0 / policy.alpha
    rates = _rates(arms)
    few = min(arms.answers_candidate, arms.answers_production)
    if few < policy.min_answers:
        return Decision(
            CONTINUE,
            share,
            ratio,
            d,
            f"collecting: {few} answers in the smaller arm, {policy.min_answers} needed; {rates}",
        )
    if ratio >= bound and d is not None:
        if d < 0:
            return Decision(
                PROMOTE, share, ratio, d, f"candidate better: Λ {ratio:.1f} ≥ {bound:g}; {rates}"
            )
        return Decision(
            ROLLBACK, 0.0, ratio, d, f"candidate worse: Λ {ratio:.1f} ≥ {bound:g}; {rates}"
        )
    at_share = arms.answers_candidate - answers_at_share
    step = next_share(share, policy.ramp)
    if step > share and at_share >= policy.min_answers and (d or 0.0) <= policy.ramp_max_harm:
        return Decision(
            CONTINUE,
            step,
            ratio,
            d,
            f"no decision yet (Λ {ratio:.2f} < {bound:g}); safe so far, share "
            f"{share:.0%} → {step:.0%}; {rates}",
        )
    return Decision(
        CONTINUE, share, ratio, d, f"no decision yet (Λ {ratio:.2f} < {bound:g}); {rates}"
    )


def _rates(arms: Arms) -> str:
    def pct(rate: float | None) -> str:
        return "n/a" if rate is None else f"{rate:.1%}"

    return (
        f"low-score rate candidate {pct(arms.rate_candidate)} of {arms.answers_candidate}, "
        f"production {pct(arms.rate_production)} of {arms.answers_production}"
    )
