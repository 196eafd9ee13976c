"""Stage 4b, publish: checked versions to QE_PUBLISH_URL, after the blocking checks."""

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from qe_assets.lib.resources import PipelineSettings, duckdb_reader, duckdb_writer
from qe_assets.lib.stages import RELEASE_GROUP
from qe_assets.release.assets import tuning_dataset
from qe_assets.release.forget import Takedowns, pending_takedowns, record_takedowns, take_down
from qe_assets.release.publish import (
    Published,
    PublishError,
    open_store,
    publishable,
    record_publication,
    upload_version,
)
from qe_assets.settings import Settings
from qe_assets.store import connect, writer_connection


class VersionGone(PublishError):
    """The version was superseded (`qe forget`) while it was being uploaded."""


def publish_versions(
    database: Path,
    settings: Settings,
    checked: str | None,
    *,
    versions: list[str] | None = None,  # only these, uploaded again where the copy differs
    config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[Published]:
    """Publish every publishable version (or just `versions`) to QE_PUBLISH_URL, oldest first.

    Uploads run without the writer lock (they take long and write nothing local); the manifest's
    write and the row recording it take it, so a `qe forget` superseding the version either
    comes first (and the manifest is never written) or after (and unpublishes it)."""
    destination = settings.publish_url
    if not destination or not database.exists():
        return []
    with connect(database, read_only=True) as conn:
        pending = publishable(conn, destination, checked, again=versions is not None)
    if versions is not None:
        unknown = sorted(set(versions) - {v for v, _ in pending})
        if unknown:
            raise PublishError(
                f"{', '.join(unknown)}: not publishable (no such version, refused by a blocking "
                "check, superseded by `qe forget`, or not checked yet)"
            )
        pending = [(v, s) for v, s in pending if v in versions]
    store = open_store(destination)
    done = []
    for version, manifest_sha256 in pending:

        def commit(write: Callable[[], None], version: str = version) -> None:
            with writer_connection(database, config=config) as conn:
                gone = conn.execute(
                    "SELECT 1 FROM version_supersessions WHERE version = ?", [version]
                ).fetchall()
                if gone:
                    raise VersionGone(f"{version} was superseded by `qe forget`: not published")
                write()

        try:
            published = upload_version(
                store,
                settings.datasets_dir,
                version,
                manifest_sha256,
                commit=commit,
                on_file=lambda name: log(f"uploading {name}"),
            )
        except VersionGone as exc:  # its objects stay unnamed by any manifest: never read
            log(str(exc))
            continue
        with writer_connection(database, config=config) as conn:
            record_publication(conn, destination, manifest_sha256, published)
        log(
            f"{version} published at {published.location}: {published.uploaded_files} of "
            f"{published.files} files uploaded ({published.uploaded_bytes / 1e6:.1f} MB, "
            f"{published.mb_per_second:.1f} MB/s)"
        )
        done.append(published)
    return done


def _checked_in_this_run(context: dg.AssetExecutionContext) -> str | None:
    """The version `tuning_dataset` published in this run: its blocking checks passed, or this
    step would not run."""
    event = context.instance.get_latest_materialization_event(tuning_dataset.key)
    if event is None or event.run_id != context.run.run_id or event.asset_materialization is None:
        return None
    version = event.asset_materialization.metadata.get("version")
    return None if version is None else str(version.value)


def _withdraw_superseded(
    duckdb: DuckDBResource, settings: Settings, log: Callable[[str], None]
) -> Takedowns:
    """Take down the published copies of versions `qe forget` superseded while their store was
    down: the person's samples must not stay public until someone runs `qe forget` again. The
    stores are called without the writer lock; the rows are recorded under it."""
    with duckdb_reader(duckdb) as conn:
        pending = [] if conn is None else pending_takedowns(conn)
    takedowns = take_down(pending, settings.forget_delete_remote)
    if takedowns.taken:
        with duckdb_writer(duckdb) as conn:
            record_takedowns(conn, takedowns)
    for line in takedowns.done:
        log(f"superseded version taken down: {line}")
    return takedowns


@dg.asset(
    deps=[tuning_dataset],
    group_name=RELEASE_GROUP,
    kinds={"s3", "file"},
    output_required=False,
    description=(
        "Checked dataset versions published to QE_PUBLISH_URL (an S3-compatible bucket, a "
        "directory, or a Hugging Face dataset-repo folder per version); nothing when it is "
        "unset. Runs after the blocking checks pass; publishes the version this run checked "
        "and every earlier one that passed its checks but is not there yet. Each file is "
        "verified against its manifest's sha256; the manifest goes last, as the commit marker; "
        "an interrupted upload resumes where it stopped. First, it takes down every published "
        "copy of a version `qe forget` superseded while its store was unreachable "
        "(QE_FORGET_DELETE_REMOTE decides unpublish or delete). `qe versions` shows where each "
        "version lives."
    ),
    metadata={"setting": "QE_PUBLISH_URL"},
)
def published_dataset(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, settings: PipelineSettings
) -> Iterator[dg.MaterializeResult]:
    takedowns = _withdraw_superseded(duckdb, settings, context.log.info)
    for problem in takedowns.problems:
        context.log.warning(f"a superseded version is still published: {problem}")
    withdrawn: dict[str, Any] = {}
    if takedowns.taken or takedowns.problems:
        withdrawn = {
            "taken_down": dg.MetadataValue.json(takedowns.done),
            "takedowns_pending": len(takedowns.problems),
            "takedown_errors": dg.MetadataValue.json(takedowns.problems),
        }
    done: list[Published] = []
    if not settings.publish_url:
        context.log.info("QE_PUBLISH_URL is not set: nothing to publish")
    else:
        try:
            done = publish_versions(
                Path(duckdb.database),
                settings,
                _checked_in_this_run(context),
                config=duckdb.connection_config,
                log=context.log.info,
            )
        except PublishError as exc:
            # One line naming the setting; the version stays committed locally and the next run
            # publishes it.
            raise dg.Failure(description=str(exc), metadata=withdrawn) from None
        if not done:
            context.log.info("every checked version is published already")
    if not done and not withdrawn:
        return
    uploaded = sum(p.uploaded_bytes for p in done)
    seconds = sum(p.seconds for p in done)
    published: dict[str, Any] = {}
    if done:
        published = {
            "destination": settings.publish_url,
            "versions": dg.MetadataValue.json([p.version for p in done]),
            "locations": dg.MetadataValue.json({p.version: p.location for p in done}),
            "uploaded_bytes": uploaded,
            "upload_mb_per_second": round(uploaded / 1e6 / seconds, 1) if seconds else 0.0,
        }
    # The check below turns a copy still public into a failed check on this asset's page.
    yield dg.MaterializeResult(
        metadata={**published, **withdrawn},
        data_version=dg.DataVersion(done[-1].version) if done else None,
    )


@dg.asset_check(
    asset=published_dataset,
    description=(
        "Fails while a version that `qe forget` superseded is still published somewhere (its "
        "store was unreachable when the copy was to be taken down), naming each version and "
        "where it is. `published_dataset` retries on every run and records the store's error "
        "(`takedown_errors`); `qe status` warns, and `qe versions` lists the copies."
    ),
)
def superseded_copies_withdrawn(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    with duckdb_reader(duckdb) as conn:
        pending = [] if conn is None else pending_takedowns(conn)
    if not pending:
        return dg.AssetCheckResult(passed=True, description="no superseded version is published")
    copies = [f"{version} at {destination}" for version, destination, _ in pending]
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"still published though superseded by `qe forget`: {'; '.join(copies)} (the store "
            "failed when it was taken down; the next published_dataset run tries again, its "
            "log says why)"
        ),
        metadata={"still_published": dg.MetadataValue.json(copies)},
    )
