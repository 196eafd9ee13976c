"""The A/B test's statistics: an mSPRT on the difference of two low-score rates (pure Python).

Why an mSPRT (Johari, Pekelis, Walsh: "Always valid inference", 2017): `ab_test` looks at the
data after every run, and a fixed-n z-test read that often promotes an equal candidate far more
often than its nominal 5 %. The mixture sequential probability ratio test keeps
P(ever rejecting an equal candidate) ≤ alpha however often it is read, which is exactly the
false-promotion guarantee we want (a Bayesian posterior with a threshold gives no such bound).

With d = rate_candidate − rate_production, its variance V under H0 (pooled rate p̄:
V = p̄(1 − p̄)(1/n_c + 1/n_p); both combined over the periods of constant share when the ramp
moved, see `stratified_difference`), and a normal mixture N(0, tau²) over the true difference, the
mixture likelihood ratio is

    Λ = sqrt(V / (V + tau²)) · exp(d² tau² / (2 V (V + tau²)))

and H0 (equal rates) is rejected once Λ ≥ 1/alpha: promote when d < 0 (fewer low-score answers),
roll back when d > 0. tau is the size of difference the test is tuned to find fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qe_assets.settings import Settings

PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"


@dataclass(frozen=True)
class Arms:
    """Answers and low-score answers of production and candidate over the test so far, and the
    same per period of constant share (`strata`, oldest first; empty: one period)."""

    answers_production: int
    low_production: int
    answers_candidate: int
    low_candidate: int
    strata: tuple[tuple[int, int, int, int], ...] = ()

    @classmethod
    def of_periods(cls, periods: list[tuple[int, int, int, int]]) -> Arms:
        """The arms of a test whose share changed between `periods` (each: answers and low of
        production, then of the candidate)."""
        totals = [sum(column) for column in zip(*periods, strict=True)] or [0, 0, 0, 0]
        return cls(*totals, strata=tuple(periods))

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
    share: (
        float  # the candidate's share after it (0 after a rollback or a promotion: its test ends)
    )
    statistic: float  # the mixture likelihood ratio Λ
    difference: float | None  # rate_candidate − rate_production
    reason: str

    @property
    def harmful(self) -> bool:
        """The candidate's low-score rate is significantly worse."""
        return self.decision == ROLLBACK


def stratified_difference(
    strata: tuple[tuple[int, int, int, int], ...],
) -> tuple[float, float] | None:
    """(d, V): the difference of low-score rates combined over periods of constant share with
    Cochran–Mantel–Haenszel weights w = n_c·n_p / (n_c + n_p), and its variance under equal
    rates, Σ w·p̄(1 − p̄) / (Σ w)². None when no period has answers in both arms.

    Why per period: the ramp puts most of the candidate's answers late in the test, production's
    evenly over it; when the low-score rate drifts (time of day, a new question mix), pooled
    counts show a difference an equal candidate does not have. Within a period both arms see
    the same traffic, so each period's difference is unbiased, and so is their weighted sum.
    With one period this is the plain two-proportion difference and its pooled variance."""
    weight = spread = weighted_d = 0.0
    for n_p, low_p, n_c, low_c in strata:
        if n_p == 0 or n_c == 0:
            continue
        w = n_c * n_p / (n_c + n_p)
        pooled = (low_c + low_p) / (n_c + n_p)
        weight += w
        weighted_d += w * (low_c / n_c - low_p / n_p)
        spread += w * pooled * (1.0 - pooled)
    if weight == 0.0:
        return None
    return weighted_d / weight, spread / (weight * weight)


def mixture_ratio(arms: Arms, tau: float) -> tuple[float, float | None]:
    """(Λ, d): the mSPRT's mixture likelihood ratio and the observed difference of rates
    (per period of constant share, see `stratified_difference`)."""
    strata = arms.strata or (
        (arms.answers_production, arms.low_production, arms.answers_candidate, arms.low_candidate),
    )
    combined = stratified_difference(strata)
    if combined is None:
        return 1.0, None
    d, variance = combined
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
            # The candidate becomes production: as a candidate it has no share any more.
            return Decision(
                PROMOTE, 0.0, ratio, d, f"candidate better: Λ {ratio:.1f} ≥ {bound:g}; {rates}"
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


# Beyond this many more candidate answers an estimate says "not at these rates".
MAX_ESTIMATE = 10_000_000


@dataclass(frozen=True)
class Distance:
    """How far a running test is from a decision: Λ against its threshold 1/alpha, and about how
    many more candidate answers (at the current share and today's rates) reach it."""

    statistic: float
    threshold: float
    share: float
    more_answers: int | None  # None: no decision expected at these rates (or no share)
    no_rates_yet: bool = False  # an arm has no answer: `more_answers` is only the minimum

    @property
    def more_requests(self) -> int | None:
        """All requests (both arms) that bring `more_answers` candidate answers at this share."""
        if self.more_answers is None or self.share <= 0:
            return None
        return math.ceil(self.more_answers / self.share)

    def text(self) -> str:
        head = f"Λ {self.statistic:.1f} of {self.threshold:g} needed"
        if self.more_answers is None:
            return f"{head}; no decision in sight at today's rates and this share"
        if self.more_answers == 0:
            return f"{head}; decidable now"
        if self.no_rates_yet:
            return (
                f"{head}; at least {self.more_answers:,} more candidate answers at "
                f"{self.share:.0%} (~{self.more_requests:,} requests) before any decision"
            )
        return (
            f"{head}; about {self.more_answers:,} more candidate answers at {self.share:.0%} "
            f"(~{self.more_requests:,} requests), at today's rates"
        )


def distance_to_decision(arms: Arms, share: float, policy: Policy) -> Distance:
    """Λ now, and the fewest more candidate answers after which both arms have
    `policy.min_answers` and Λ ≥ 1/alpha, if the arms' rates stayed as they are and production
    got (1 − share)/share answers per candidate answer. An estimate to size a canary with, not a
    promise: the rates move as answers come in."""
    statistic, _ = mixture_ratio(arms, policy.tau)
    bound = 1.0 / policy.alpha
    rate_c, rate_p = arms.rate_candidate, arms.rate_production
    if share <= 0:
        return Distance(statistic, bound, share, None)
    per_candidate = (1.0 - share) / share
    if rate_c is None or rate_p is None:
        short = max(
            policy.min_answers - arms.answers_candidate,
            math.ceil((policy.min_answers - arms.answers_production) / per_candidate)
            if per_candidate
            else 0,
        )
        return Distance(statistic, bound, share, max(short, 0), no_rates_yet=True)
    strata = arms.strata or (
        (arms.answers_production, arms.low_production, arms.answers_candidate, arms.low_candidate),
    )

    def decided(k: int) -> bool:
        n_p = k * per_candidate
        more = (n_p, n_p * rate_p, float(k), k * rate_c)
        extended = Arms.of_periods([*strata, more])  # type: ignore[list-item]
        enough = min(extended.answers_candidate, extended.answers_production) >= policy.min_answers
        return enough and mixture_ratio(extended, policy.tau)[0] >= bound

    if decided(0):
        return Distance(statistic, bound, share, 0)
    high = 1
    while not decided(high):
        if high > MAX_ESTIMATE:
            return Distance(statistic, bound, share, None)
        high *= 2
    low = high // 2  # not decided at `low` (or low == 0), decided at `high`
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if decided(middle) else (middle, high)
    return Distance(statistic, bound, share, high)


def policy_of(settings: Settings) -> Policy:
    """The test's knobs (QE_AB_*) as a `Policy`."""
    return Policy(
        alpha=settings.ab_alpha,
        tau=settings.ab_tau,
        min_answers=settings.ab_min_answers,
        ramp=tuple(settings.ab_ramp),
        ramp_max_harm=settings.ab_ramp_max_harm,
    )
