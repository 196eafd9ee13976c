"""Asset definitions, one module per stage of the pipeline."""

from collections.abc import Iterable, Iterator

import dagster as dg

from qe_assets.review.backlog import Verdict

# Two groups, matching the two jobs, so the lineage page opens on two readable boxes: what runs
# whenever events arrive, and what runs when a release is due.
PIPELINE_GROUP = "pipeline"
RELEASE_GROUP = "release"


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
