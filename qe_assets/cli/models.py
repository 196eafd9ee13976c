"""`qe models`: the models, the production one, and changes to the rollout by hand."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qe_assets.settings import Settings

if TYPE_CHECKING:
    import duckdb

    from qe_assets.rollout.registry import ActiveTest
from qe_assets.cli.common import EXIT_FAILED, EXIT_OK, UserError, _err, _require_store, _reviewer


def _models_list(settings: Settings, wait: float) -> int:
    import duckdb
    import polars as pl

    from qe_assets.finetune.serving.resource import served_names
    from qe_assets.store import connect, select_frame
    from qe_assets.store.evaluations import MODELS_QUERY

    with connect(settings.database, read_only=True, wait_seconds=wait) as conn:
        try:
            frame = select_frame(conn, MODELS_QUERY)
        except duckdb.CatalogException:  # a store from before the evaluation gate
            frame = pl.DataFrame()
        rollout = _rollout_lines(conn)
    names = served_names(settings.data_dir)
    if names and not frame.is_empty():
        # The name the model server serves each model under (QE_MODEL_SERVER, docs/serving.md).
        served = pl.col("model").replace_strict(names, default=None, return_dtype=pl.String)
        frame = frame.insert_column(1, frame.select(served.alias("served_as")).to_series())
    if frame.is_empty():
        print("no fine-tuned or promoted model yet")
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=70, tbl_width_chars=200):
            print(frame)
    for line in rollout:
        print(line)
    return EXIT_OK


def _rollout_lines(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The A/B rollout state for `qe models list`: the running test and its last look."""
    import duckdb

    from qe_assets.rollout import registry as ab

    try:
        test = ab.active_test(conn)
        rows = ab.newest_test_rows(conn)
    except duckdb.CatalogException:  # a store from before the rollout
        return []
    if not rows:
        return ["rollout: no A/B test yet"]
    last = rows[-1]
    looked = (
        f"last look {last['decided_at']:%Y-%m-%d %H:%M} UTC: {last['decision']} by "
        f"{last['decided_by']} ({last['reason']})"
    )
    if test is None:
        return [
            f"rollout: no candidate has traffic; the last test ({last['candidate']}) "
            f"ended: {looked}"
        ]
    return [
        f"rollout: {test.candidate} at {test.share:.0%} of traffic against {test.production}, "
        f"since {test.started_at:%Y-%m-%d %H:%M} UTC",
        f"  {looked}",
    ]


def _models_change(args: argparse.Namespace, conn: duckdb.DuckDBPyConnection, by: str) -> str:
    """Record one `qe models promote|rollback|rollout` under the writer lock; what happened."""
    from qe_assets.rollout import registry as ab
    from qe_assets.store import evaluations as registry

    current = registry.production_model(conn)
    test = ab.active_test(conn)
    if getattr(args, "model", None):
        # A served name (`model_rag_qa_v002`, what rollout.json says) stands for its model id.
        by_name = {name: model for model, name in ab.served_aliases(conn).items()}
        args.model = by_name.get(args.model, args.model)
    if args.action == "rollout":
        return _rollout_change(args, conn, by, current, test)
    if args.action == "rollback" and test is not None:
        ab.stop_test(conn, test, by, args.reason)
        return f"rollback: {test.candidate} gets no traffic any more; {test.production} stays"
    if args.action == "promote":
        model, action = args.model, registry.PROMOTE_ACTION
        if not registry.known_model(conn, model):
            raise UserError(
                f"{model}: no such model (not a trained, base or earlier production model)",
                EXIT_FAILED,
            )
        if model == current:
            return f"{model} is already the production model; nothing recorded"
    else:
        model, action = registry.rollback_target(conn), registry.ROLLBACK_ACTION
        if model is None:
            raise UserError(
                f"nothing to roll back to: {current or 'no model'} is the only "
                "production model on record",
                EXIT_FAILED,
            )
    try:
        registry.record_promotion(conn, model, by, action=action, reason=args.reason)
    except registry.ModelFlagged as exc:
        raise UserError(str(exc), EXIT_FAILED) from None
    return f"{action}: {model} is the production model (was {current or 'none'}), by {by}"


def _rollout_change(
    args: argparse.Namespace,
    conn: duckdb.DuckDBPyConnection,
    by: str,
    current: str | None,
    test: ActiveTest | None,
) -> str:
    from qe_assets.rollout import registry as ab
    from qe_assets.store.evaluations import ModelFlagged

    model, share = args.model, args.share
    if not 0.0 <= share <= 1.0:
        raise UserError(f"--share {share}: give a share of traffic between 0 and 1, e.g. 0.1")
    if model == current:
        raise UserError(f"{model} is the production model already; nothing to roll out")
    if ab.gate_passed(conn, model) is None:
        raise UserError(
            f"{model}: only a candidate that passed the evaluation gate may get traffic "
            "(see `qe models list`)",
            EXIT_FAILED,
        )
    production = test.production if test is not None and test.candidate == model else current
    # Before any promotion: the model the last test ran against (the gate's base model).
    production = production or ab.state_by_id(conn).production
    if production is None:
        raise UserError(f"no production model on record to test {model} against", EXIT_FAILED)
    try:
        ab.start_test(conn, model, production, share, by, args.reason, decision=ab.SET_SHARE)
    except ModelFlagged as exc:
        raise UserError(str(exc), EXIT_FAILED) from None
    return f"rollout: {model} at {share:.0%} of traffic against {production}, by {by}"


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.rollout.assets import served_base_url
    from qe_assets.rollout.registry import sync_state_file
    from qe_assets.service.rollout import state_path
    from qe_assets.store import connect, ensure_schema, writer_lock

    _require_store(settings)
    if args.action in (None, "list"):
        return _models_list(settings, args.wait)
    reviewer = _reviewer(args)

    def waiting(holder: str) -> None:
        _err(f"waiting for the DuckDB writer lock, held by {holder}")

    with (
        writer_lock(settings.database, on_wait=waiting),
        connect(settings.database, wait_seconds=args.wait) as conn,
    ):
        ensure_schema(conn)
        message = _models_change(args, conn, reviewer)
        sync_state_file(conn, state_path(settings), served_base_url(settings))
        event = _rollout_event(conn, settings, reviewer, message)
    print(message)
    problem = _report_to_dagster(settings, event)
    if problem:
        _err(f"warning: {problem}")
    return EXIT_OK


def _rollout_event(
    conn: duckdb.DuckDBPyConnection, settings: Settings, by: str, what: str
) -> object:
    """ab_test as it stands after a person's change, to report to Dagster."""
    from qe_assets.rollout.assets import rollout_changed

    return rollout_changed(conn, settings, by, what)


def _report_to_dagster(settings: Settings, event: object) -> str | None:
    """Tell the Dagster instance of this data directory (DAGSTER_HOME) that ab_test changed, so
    its page agrees with rollout.json at once; a problem is a warning, the change stands."""
    import dagster as dg

    from qe_assets.ops.runner import prepare_dagster_home
    from qe_assets.rollout.assets import report_rollout_change

    try:
        instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    except Exception as exc:  # any: the change is recorded; Dagster is only told
        return f"could not open the Dagster instance ({type(exc).__name__}: {exc})"
    with instance:
        return report_rollout_change(instance, event)  # type: ignore[arg-type]
