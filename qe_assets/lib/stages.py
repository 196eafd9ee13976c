"""What every stage's assets share: the two asset groups, check verdicts and their results."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import dagster as dg

# Two groups, matching the two jobs, so the lineage page opens on two readable boxes: what runs
# whenever events arrive, and what runs when a release is due.
PIPELINE_GROUP = "pipeline"
RELEASE_GROUP = "release"


@dataclass(frozen=True)
class Verdict:
    """A check's outcome, for an `AssetCheckResult` (in a run) or an `AssetCheckEvaluation` (from
    the sensor)."""

    passed: bool
    description: str
    metadata: dict[str, str | int | float]


def age_seconds(oldest_at: datetime | None, now: datetime) -> float | None:
    return None if oldest_at is None else max((now - oldest_at).total_seconds(), 0.0)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 7_200 else f"{seconds / 3_600:.1f} h"


def check_result(asset: str, name: str, verdict: Verdict) -> dg.AssetCheckResult:
    """A warning-level check result of a multi-asset, from a shared `Verdict`."""
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=name,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=verdict.description,
        metadata=verdict.metadata,
    )


StageEvent = dg.MaterializeResult | dg.AssetCheckResult


def only_selected(
    context: dg.AssetExecutionContext, events: Iterable[StageEvent]
) -> Iterator[StageEvent]:
    """What a subsettable multi-asset yields: the stage writes all its tables whatever was
    selected (one transaction writes both), but reports only the assets and checks asked for, so
    `annotated_samples` alone can be materialized from the UI."""
    for event in events:
        if isinstance(event, dg.AssetCheckResult):
            key = dg.AssetCheckKey(dg.AssetKey.from_coercible(event.asset_key), event.check_name)
            if key in context.selected_asset_check_keys:
                yield event
        elif dg.AssetKey.from_coercible(event.asset_key) in context.selected_asset_keys:
            yield event
