"""Run the real Definitions in process against given settings (tests and benchmarks)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from qe_assets.ops.definitions import ASSET_CHECKS, ASSETS, build_resources
from qe_assets.settings import Settings


def materialize(
    settings: Settings,
    selection: str | list[str] | dg.AssetSelection | None = None,
    instance: dg.DagsterInstance | None = None,
    raise_on_error: bool = True,
    force: bool = True,
    log_level: str | None = None,
) -> dg.ExecuteInProcessResult:
    """All assets and checks of the code location (or a selection), as the UI would run them.

    With `force` (the default: most tests want a version from a few samples), `tuning_dataset`
    cuts below the threshold, as `qe run --cut-version` asks it to; `force=False` is the UI's
    plain "Materialize all"."""
    assets = [*ASSETS, *ASSET_CHECKS]
    resources = build_resources(settings)
    graph = dg.Definitions(assets=assets, resources=resources).resolve_asset_graph()
    selected = dg.AssetSelection.from_coercible(selection or "*").resolve(graph)
    run_config: dict[str, Any] = {}
    if dg.AssetKey("tuning_dataset") in selected:
        run_config["ops"] = {"tuning_dataset": {"config": {"force": force}}}
    if log_level is not None:  # the console logger's level (Dagster's default: DEBUG)
        run_config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    return dg.materialize(
        assets,
        selection=selection,
        resources=resources,
        instance=instance,
        raise_on_error=raise_on_error,
        run_config=run_config or None,
    )


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """What the asset last reported: its materialization, else its observation (what
    `fine_tuned_model` reports when nothing was trained)."""
    key = dg.AssetKey(asset)
    events = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key == key
    ] or [
        e.asset_observation_data.asset_observation
        for e in result.get_asset_observation_events()
        if e.asset_observation_data.asset_observation.asset_key == key
    ]
    if not events:
        return {}
    return {k: v.value for k, v in events[-1].metadata.items()}
