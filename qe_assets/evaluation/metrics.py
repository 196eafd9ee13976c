"""Win rate, its Wilson bound, per-label tables and the gate's decision: pure functions.

Verdicts are from the candidate's side: `win`, `loss`, `tie` for judged pairs, and a `loss` too
when the candidate answered nothing usable (empty, truncated, refused, filtered: it failed the
item). `failed` is left for what says nothing about the candidate: the judge, the endpoint or the
production model failed. Those are counted, never scored, and bounded: above
QE_EVAL_MAX_FAILED_SHARE of the items the gate does not decide (`insufficient_data`, retried).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

WIN, LOSS, TIE, FAILED = "win", "loss", "tie", "failed"
PROMOTE, BLOCK, INSUFFICIENT = "promote", "block", "insufficient_data"
# The per-label guard of the gate: a label with this many judged items must not fall below this
# win rate, whatever the overall bound says.
LABEL_MIN_ITEMS = 20
LABEL_FLOOR = 0.4
Z_95 = 1.959964


def wilson_lower_bound(successes: float, n: int, z: float = Z_95) -> float:
    """Lower end of the Wilson score interval of a proportion (0 when n is 0). Ties enter as
    half a success, as in the win rate."""
    if n <= 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


@dataclass(frozen=True)
class Tally:
    """Counts of one group of pairs and what they mean."""

    n: int  # judged pairs: wins + ties + losses
    wins: int
    ties: int
    losses: int
    failed: int

    @property
    def win_rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else 0.0

    @property
    def ci_low(self) -> float:
        return wilson_lower_bound(self.wins + 0.5 * self.ties, self.n)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "failed": self.failed,
            "win_rate": round(self.win_rate, 4),
            "ci_low": round(self.ci_low, 4),
        }


def tally(verdicts: pl.Series) -> Tally:
    counts = dict(verdicts.value_counts().iter_rows())
    wins, ties, losses = (int(counts.get(v, 0)) for v in (WIN, TIE, LOSS))
    return Tally(wins + ties + losses, wins, ties, losses, int(counts.get(FAILED, 0)))


def per_label(items: pl.DataFrame) -> dict[str, Tally]:
    """label → Tally, for a frame with `label` and `verdict`."""
    return {
        label: tally(group["verdict"])
        for (label,), group in items.sort("label").group_by("label", maintain_order=True)
    }


@dataclass(frozen=True)
class Decision:
    decision: str  # promote | block | insufficient_data
    reason: str
    # insufficient_data because too many items failed (the judge or the endpoint was down): a
    # later run evaluates again, unlike too few held-out items, which only a new cut changes.
    retry: bool = False

    @property
    def passed(self) -> bool:
        return self.decision == PROMOTE


def decide(
    overall: Tally,
    labels: dict[str, Tally],
    *,
    min_items: int,
    margin: float,
    max_failed_share: float = 0.05,
) -> Decision:
    """The gate: failures within `max_failed_share` of the items, enough judged pairs, a 95 %
    lower bound above 0.5 + margin, and no label with at least LABEL_MIN_ITEMS pairs below a
    win rate of LABEL_FLOOR."""
    items = overall.n + overall.failed
    if overall.failed > max_failed_share * items:
        return Decision(
            INSUFFICIENT,
            f"{overall.failed} of {items} items failed (judge, endpoint or production model), "
            f"above QE_EVAL_MAX_FAILED_SHARE={max_failed_share:g}: evaluated again next run",
            retry=True,
        )
    if overall.n < min_items:
        return Decision(
            INSUFFICIENT,
            f"{overall.n} judged pairs, fewer than QE_EVAL_MIN_ITEMS={min_items}",
        )
    bar = 0.5 + margin
    if overall.ci_low <= bar:
        return Decision(
            BLOCK,
            f"win rate {overall.win_rate:.3f}, lower bound {overall.ci_low:.3f} "
            f"not above {bar:.3f}",
        )
    regressed = [
        f"{label} ({t.win_rate:.3f} over {t.n})"
        for label, t in labels.items()
        if t.n >= LABEL_MIN_ITEMS and t.win_rate < LABEL_FLOOR
    ]
    if regressed:
        return Decision(BLOCK, f"labels regress below {LABEL_FLOOR}: {', '.join(regressed)}")
    return Decision(
        PROMOTE,
        f"win rate {overall.win_rate:.3f}, lower bound {overall.ci_low:.3f} above {bar:.3f}",
    )


def label_table(labels: dict[str, Tally]) -> str:
    """The per-label table as markdown, for the UI."""
    rows = [
        f"| {label} | {t.n} | {t.wins} | {t.ties} | {t.losses} | {t.failed} | "
        f"{t.win_rate:.3f} | {t.ci_low:.3f} |"
        for label, t in labels.items()
    ]
    head = "| label | n | wins | ties | losses | failed | win rate | 95 % lower |\n"
    return head + "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
