"""The judge measured against the reviewers, and what the completion stage does about it.

A judged LLM completion that a person later decides on is one measurement of the judge: the judge
approved it or not (its completion score beat the original's by QE_LLM_JUDGE_MARGIN, the rule
`llm_completion_rows` applies), and the person accepted it or not (`accepted` approves; `edited`
and `rejected` do not: the text was not fit to train on as it stood). Agreement is the share of
those decisions on which both said the same, over the last QE_JUDGE_AGREEMENT_WINDOW decisions,
overall and per label (docs/judge-calibration.md).

Below QE_JUDGE_MIN_AGREEMENT, once there are QE_JUDGE_MIN_DECISIONS decisions, the judge is not
trusted: `judge_gate` says which of its approvals go to the review queue (reason `judge_check`)
instead of straight into versions. Those reviews are measurements too, so agreement recovers as
people confirm the judge, and the gate opens again by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import duckdb

from qe_assets.settings import Settings

# The review_queue reason of a judge-approved completion held for a person while the judge is not
# trusted (next to review.py's low_confidence and spot_check).
JUDGE_CHECK = "judge_check"
OVERALL = "overall"

# One row per scope: the whole window, then each label's own window. `decided` holds every human
# decision on a completion the judge scored; the margin is applied here, so a changed
# QE_LLM_JUDGE_MARGIN re-reads the history with the rule now in force.
# DECIDED is shared with the dashboards' agreement-over-time chart.
DECIDED = """
    SELECT s.label, q.sample_id, q.reviewed_at,
           q.status = 'accepted' AS human_ok,
           c.judge_completion_score - c.judge_original_score >= $margin AS judge_ok
    FROM review_queue q
    JOIN completions c USING (sample_id)
    JOIN annotated_samples s USING (sample_id)
    WHERE q.status IN ('accepted', 'edited', 'rejected')
      AND c.judge_original_score IS NOT NULL AND c.judge_completion_score IS NOT NULL
      -- An acceptance measures the judge only when the text accepted is the one it scored (an
      -- LLM completion): accepting a judge-rejected sample keeps the naive text instead. Such
      -- rows lose their judge columns when decided; this also skips ones decided before that.
      AND (q.status <> 'accepted' OR c.mode = 'llm')
"""
_AGREEMENT = f"""
WITH decided AS ({DECIDED}),
ranked AS (
    SELECT *,
           row_number() OVER (ORDER BY reviewed_at DESC, sample_id DESC) AS overall_rank,
           row_number() OVER (
               PARTITION BY label ORDER BY reviewed_at DESC, sample_id DESC
           ) AS label_rank
    FROM decided
)
SELECT NULL::VARCHAR AS label, count(*) AS n,
       count(*) FILTER (judge_ok AND human_ok) AS both_ok,
       count(*) FILTER (judge_ok AND NOT human_ok) AS judge_only,
       count(*) FILTER (NOT judge_ok AND human_ok) AS human_only,
       count(*) FILTER (NOT judge_ok AND NOT human_ok) AS both_not
FROM ranked WHERE overall_rank <= $window
UNION ALL
SELECT label, count(*), count(*) FILTER (judge_ok AND human_ok),
       count(*) FILTER (judge_ok AND NOT human_ok), count(*) FILTER (NOT judge_ok AND human_ok),
       count(*) FILTER (NOT judge_ok AND NOT human_ok)
FROM ranked WHERE label_rank <= $window GROUP BY label
"""


@dataclass(frozen=True)
class Agreement:
    """Judge verdicts against human decisions: the four cells of the confusion table."""

    both_ok: int = 0  # judge approved, person accepted
    judge_only: int = 0  # judge approved, person edited or rejected
    human_only: int = 0  # judge did not approve, person accepted
    both_not: int = 0  # neither

    @property
    def decisions(self) -> int:
        return self.both_ok + self.judge_only + self.human_only + self.both_not

    @property
    def agreed(self) -> int:
        return self.both_ok + self.both_not

    @property
    def rate(self) -> float | None:
        """Share of decisions on which judge and person agree; None without decisions."""
        return self.agreed / self.decisions if self.decisions else None

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: agreement beyond what the two approval rates give by chance (a judge
        that approves everything agrees often with lenient reviewers, and scores 0 here)."""
        n = self.decisions
        if not n:
            return None
        judge, human = (self.both_ok + self.judge_only) / n, (self.both_ok + self.human_only) / n
        chance = judge * human + (1 - judge) * (1 - human)
        return None if chance >= 1 else (self.agreed / n - chance) / (1 - chance)

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(
            self.both_ok + other.both_ok,
            self.judge_only + other.judge_only,
            self.human_only + other.human_only,
            self.both_not + other.both_not,
        )


@dataclass(frozen=True)
class Calibration:
    overall: Agreement
    per_label: dict[str, Agreement]


def judge_agreement(conn: duckdb.DuckDBPyConnection, *, margin: float, window: int) -> Calibration:
    """Agreement over the last `window` decisions, overall and per label (one query)."""
    rows = conn.execute(_AGREEMENT, {"margin": margin, "window": window}).fetchall()
    overall = Agreement()
    per_label: dict[str, Agreement] = {}
    for label, _n, *cells in rows:
        agreement = Agreement(*(int(cell) for cell in cells))
        if label is None:
            overall = agreement
        else:
            per_label[label] = agreement
    return Calibration(overall, dict(sorted(per_label.items())))


@dataclass(frozen=True)
class JudgeGate:
    """Which judge approvals must wait for a person: all of them, those of some labels, or none."""

    route_all: bool = False
    labels: frozenset[str] = frozenset()
    problems: tuple[str, ...] = ()

    @property
    def trusted(self) -> bool:
        return not (self.route_all or self.labels)

    def routes(self, label: str) -> bool:
        return self.route_all or label in self.labels


def _below(name: str, agreement: Agreement, min_agreement: float, min_decisions: int) -> str | None:
    rate = agreement.rate
    if agreement.decisions < min_decisions or rate is None or rate >= min_agreement:
        return None
    return (
        f"{name}: judge agrees with reviewers on {rate:.0%} of the last {agreement.decisions} "
        f"decisions (bar {min_agreement:.0%})"
    )


def judge_gate(calibration: Calibration, *, min_agreement: float, min_decisions: int) -> JudgeGate:
    """The decision: every approval goes to review while overall agreement is under the bar;
    otherwise only the approvals of labels whose own agreement is. A scope with fewer than
    `min_decisions` decisions says nothing yet (the judge keeps its say there)."""
    overall = _below(OVERALL, calibration.overall, min_agreement, min_decisions)
    labels = {
        label: problem
        for label, agreement in calibration.per_label.items()
        if (problem := _below(label, agreement, min_agreement, min_decisions)) is not None
    }
    problems = ([overall] if overall else []) + list(labels.values())
    return JudgeGate(overall is not None, frozenset(labels), tuple(problems))


def merged_labels(calibration: Calibration, rename: Mapping[str, str]) -> dict[str, Agreement]:
    """Per-label agreement under other names (redacted labels); labels that meet add up."""
    merged: dict[str, Agreement] = {}
    for label, agreement in calibration.per_label.items():
        name = rename.get(label, label)
        merged[name] = merged.get(name, Agreement()) + agreement
    return merged


def gate_state(gate: JudgeGate) -> str:
    return "open" if gate.trusted else ("all" if gate.route_all else "some labels")


def agreement_metadata(
    calibration: Calibration, gate: JudgeGate, labels: Iterable[tuple[str, Agreement]]
) -> dict[str, float | int | str]:
    """Flat numbers for asset metadata (the Plots tab charts each over time)."""
    overall = calibration.overall
    metadata: dict[str, float | int | str] = {
        "judge/decisions": overall.decisions,
        "judge/gate": gate_state(gate),
    }
    if overall.rate is not None:
        metadata["judge/agreement"] = round(overall.rate, 4)
    if overall.kappa is not None:
        metadata["judge/kappa"] = round(overall.kappa, 4)
    for label, agreement in labels:
        metadata[f"judge/decisions/{label}"] = agreement.decisions
        if agreement.rate is not None:
            metadata[f"judge/agreement/{label}"] = round(agreement.rate, 4)
    return metadata


def calibrate(conn: duckdb.DuckDBPyConnection, settings: Settings) -> tuple[Calibration, JudgeGate]:
    """The judge's agreement now, and the gate it sets, with the settings in force."""
    calibration = judge_agreement(
        conn, margin=settings.llm_judge_margin, window=settings.judge_agreement_window
    )
    gate = judge_gate(
        calibration,
        min_agreement=settings.judge_min_agreement,
        min_decisions=settings.judge_min_decisions,
    )
    return calibration, gate
