"""`qe versions` (where each version lives and whether its remote copy still matches; publish
again) and `qe forget` (a person's data out of every table, file and published version)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qe_assets.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(message: str) -> None:
    print(f"qe: {message}", file=sys.stderr)


def _version_rows(settings: Settings, version: str | None = None) -> list[dict[str, Any]]:
    from qe_assets.store import connect

    query = """
        SELECT v.version, v.sample_count, v.created_at, v.manifest_sha256,
               s.version IS NOT NULL AS superseded, s.superseded_by,
               p.destination, p.location, p.status
        FROM dataset_versions v
        LEFT JOIN version_supersessions s USING (version)
        LEFT JOIN version_publications p USING (version)
        WHERE ? IS NULL OR v.version = ?
        ORDER BY v.number, p.destination
    """
    with connect(settings.database, read_only=True) as conn:
        cursor = conn.execute(query, [version, version])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _remote(row: dict[str, Any], deep: bool) -> tuple[str, list[str]]:
    from qe_assets.release.publish import PublishError, open_store, remote_state

    if row["destination"] is None:
        return "-", []
    if row["status"] != "published":
        return row["status"], []
    try:
        state = remote_state(
            open_store(row["destination"]), row["version"], row["manifest_sha256"], deep=deep
        )
    except PublishError as exc:
        return "unreachable", [str(exc)]
    return state.state, state.problems


def _versions_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = _version_rows(settings)
    if not rows:
        print("no dataset version yet")
        return EXIT_OK
    print(f"{'version':8} {'samples':>8}  {'created (UTC)':19}  {'remote':11}  where")
    for row in rows:
        state = "-" if args.no_check else _remote(row, deep=False)[0]
        where = row["location"] or "local only"
        if row["superseded"]:
            where += f"  (superseded by {row['superseded_by'] or 'nothing'}: qe forget)"
        created = str(row["created_at"])[:19]
        print(f"{row['version']:8} {row['sample_count']:>8}  {created:19}  {state:11}  {where}")
    return EXIT_OK


def _versions_show(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.release.export import VersionFiles

    rows = _version_rows(settings, args.version)
    if not rows:
        _err(f"no dataset version {args.version} (see `qe versions list`)")
        return EXIT_USAGE
    first = rows[0]
    files = VersionFiles.at(settings.datasets_dir, first["version"])
    print(f"version      {first['version']}")
    print(f"samples      {first['sample_count']}")
    print(f"created      {first['created_at']} UTC")
    print(f"local        {files.manifest} (sha256 {first['manifest_sha256'][:16]}…)")
    if first["superseded"]:
        print(f"superseded   by {first['superseded_by'] or 'nothing'} (qe forget)")
    code = EXIT_OK
    for row in rows:
        if row["destination"] is None:
            print("published    nowhere (QE_PUBLISH_URL unset when it was released)")
            continue
        state, problems = _remote(row, deep=args.deep)
        print(f"published    {row['location']} [{row['status']}]: remote copy {state}")
        for problem in problems:
            print(f"  - {problem}")
        if state in ("differs", "missing", "unreachable"):
            code = EXIT_FAILED
    return code


def _versions_publish(args: argparse.Namespace, settings: Settings) -> int:
    from qe_assets.release.publish import PublishError
    from qe_assets.release.published import publish_versions

    if not settings.publish_url:
        _err("QE_PUBLISH_URL is not set: nowhere to publish")
        return EXIT_USAGE
    if not settings.database.exists():
        _err(f"no database at {settings.database.absolute()}: nothing to publish")
        return EXIT_USAGE
    try:
        done = publish_versions(
            settings.database,
            settings,
            None,
            versions=args.versions or None,
            config={"memory_limit": settings.duckdb_memory_limit},
            log=lambda line: print(line, file=sys.stderr) if not args.quiet else None,
        )
    except PublishError as exc:
        _err(str(exc))
        return EXIT_FAILED
    if not done:
        print("nothing to publish: every checked version is published already")
    for published in done:
        print(
            f"{published.version}: {published.location} ({published.uploaded_files} files, "
            f"{published.uploaded_bytes / 1e6:.1f} MB uploaded, {published.mb_per_second:.1f} "
            "MB/s)"
        )
    return EXIT_OK


def _versions_dvc(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from qe_assets.release.dvc import export_dvc
    from qe_assets.release.publish import PublishError, open_store

    rows = [r for r in _version_rows(settings, args.version) if r["status"] == "published"]
    if settings.publish_url:
        rows = [r for r in rows if r["destination"] == settings.publish_url] or rows
    if not rows:
        _err(f"{args.version} is not published: run `qe versions publish {args.version}` first")
        return EXIT_FAILED
    row = rows[0]
    try:
        done = export_dvc(
            open_store(row["destination"]),
            settings.datasets_dir,
            row["version"],
            row["manifest_sha256"],
            Path(args.out),
        )
    except PublishError as exc:
        _err(str(exc))
        return EXIT_FAILED
    print(f"wrote {done.dvc_file} ({done.files} files); in the Git checkout, once:")
    print(f"  dvc remote add -d qe {done.remote_url}")
    if done.remote_url.startswith("s3://"):
        print("  dvc remote modify qe endpointurl $AWS_ENDPOINT_URL_S3   # MinIO, R2, Ceph")
    print("then: git add the .dvc file; `dvc pull` restores the version")
    return EXIT_OK


def cmd_versions(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database.exists():
        _err(f"no database at {settings.database.absolute()} yet: run `qe run` there first")
        return EXIT_USAGE
    action = args.action or "list"
    if action == "show":
        return _versions_show(args, settings)
    if action == "publish":
        return _versions_publish(args, settings)
    if action == "dvc":
        return _versions_dvc(args, settings)
    if not hasattr(args, "no_check"):
        args.no_check = False
    return _versions_list(args, settings)


def _forget_terms(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(request ids, texts) from the flags; --from-file holds request ids, one a line."""
    ids = list(args.request_id or [])
    if args.from_file:
        try:
            text = open(args.from_file, encoding="utf-8").read()  # noqa: SIM115
        except OSError as exc:
            raise ValueError(f"--from-file {args.from_file}: {exc.strerror}") from None
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    return ids, list(args.match or [])


def _print_subject(report: Any, dry_run: bool) -> None:
    subject = report.subject
    verb = "would touch" if dry_run else "touched"
    print(f"forget {report.forget_id or '(dry run)'}: {len(subject.request_ids)} request ids")
    for name, count in subject.counts.items():
        print(f"  {name:18} {count:>8}  ({verb})")
    for version, samples in subject.versions.items():
        new = report.superseding.get(version, "a new version") if not dry_run else "a new version"
        print(f"  version {version}: {len(samples)} samples → superseded by {new or 'nothing'}")
    if dry_run:
        for version, destination, _ in subject.published:
            print(f"  published {version} at {destination}: would be taken down")
    for model, version, reason in subject.models:
        print(f"  model {model} ({version}): flagged, {reason}")


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from qe_assets.release.forget import ForgetError, forget

    if not settings.database.exists():
        _err(f"no database at {settings.database.absolute()}: nothing to forget")
        return EXIT_USAGE
    try:
        ids, texts = _forget_terms(args)
        report = forget(
            settings.database,
            settings.datasets_dir,
            request_ids=ids,
            texts=texts,
            dry_run=args.dry_run,
            delete_remote=settings.forget_delete_remote,
            requested_by=os.environ.get("QE_REVIEWER") or os.environ.get("USER") or "unknown",
            config={"memory_limit": settings.duckdb_memory_limit},
            on_wait=lambda holder: _err(f"waiting for the DuckDB writer lock, held by {holder}"),
        )
    except (ForgetError, ValueError) as exc:
        _err(str(exc))
        return EXIT_FAILED
    if report.subject.empty:
        print("nothing matches: nothing was changed")
    else:
        _print_subject(report, args.dry_run)
    for line in report.remote:
        print(f"  remote: {line}")
    for problem in report.problems:
        _err(f"{problem} (the next published_dataset run or `qe forget` retries it)")
    return EXIT_FAILED if report.problems else EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `qe versions` (and, from qe_assets.release.forget, `qe forget`) on the `qe`
    parser."""
    p = sub.add_parser(
        "versions", help="dataset versions: where each lives, whether its remote copy matches"
    )
    actions = p.add_subparsers(dest="action", required=False, metavar="ACTION")
    r = actions.add_parser("list", help="every version, where it is published, remote state")
    r.add_argument("--no-check", action="store_true", help="do not contact the store")
    r = actions.add_parser("show", help="one version: its files, where it went, file by file")
    r.add_argument("version", metavar="VERSION", help="e.g. v003")
    r.add_argument("--deep", action="store_true", help="read every remote byte and compare sha256")
    r = actions.add_parser(
        "publish", help="publish checked versions to QE_PUBLISH_URL now (what the release does)"
    )
    r.add_argument("versions", nargs="*", metavar="VERSION", help="only these (default: all due)")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    r = actions.add_parser(
        "dvc", help="a .dvc file for a published version, so that `dvc pull` restores it"
    )
    r.add_argument("version", metavar="VERSION", help="e.g. v003")
    r.add_argument("--out", default=".", help="where to write the .dvc file (a Git checkout)")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser(
        "forget",
        help="remove a person's data from every table, version and published copy "
        "(--dry-run: report only)",
    )
    p.add_argument("--request-id", action="append", metavar="ID", help="repeatable")
    p.add_argument("--match", action="append", metavar="TEXT", help="text they wrote; repeatable")
    p.add_argument("--from-file", metavar="FILE", help="request ids, one a line")
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be touched, change nothing"
    )
    p.set_defaults(func=cmd_forget)
