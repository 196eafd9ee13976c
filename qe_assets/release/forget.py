"""`qe forget`: a person's data out of every table, version and published copy.

The subject is found by request id or by a text they wrote: their raw and rejected events,
samples, completions, review queue rows, LLM cache entries, evaluation set and items, and every
version holding one of their samples. Tables are changed in place (text replaced by a marker,
cache entries deleted); files are not: versions are immutable, so each affected version is
*superseded* by a new version cut from its own files without those samples, and its published
copy is taken out of readers' sight (manifest removed, or every file with
QE_FORGET_DELETE_REMOTE). Models trained on an affected version, and the later models of the same
backend that continued from them, are flagged: the gate will not promote them. An audit row
records what was done, with counts and a digest of the terms, never the terms or any text.

It runs under the writer lock for its whole length, like a stage: a running pipeline finishes
its stage first, and nothing it writes can slip between the search and the changes. The local
files of a superseded version stay (immutable, as every version); `qe versions` marks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from qe_assets.release.dataset import exported_sample_ids
from qe_assets.release.export import (
    SPLITS,
    VersionFiles,
    VersionWriter,
    dataset_card,
    fsync_dir,
    line_chunks,
    manifest_temp,
    remove_uncommitted,
    settle_manifests,
    version_name,
)
from qe_assets.release.publish import PublishError, open_store, unpublish
from qe_assets.release.readiness import version_state
from qe_assets.store import connect, transaction, writer_connection, writer_lock

FORGOTTEN = "[forgotten]"


class ForgetError(ValueError):
    """A forget request that cannot be carried out as asked; nothing was changed."""


@dataclass
class Subject:
    """What a forget request touches (read-only: what `--dry-run` reports)."""

    request_ids: list[str]
    sample_ids: list[str]
    counts: dict[str, int]
    versions: dict[str, list[str]]  # affected version -> its forgotten sample ids
    published: list[tuple[str, str, str]]  # (version, destination, manifest sha256)
    models: list[tuple[str, str, str]]  # (model, dataset version, reason)
    modes: dict[str, dict[str, int]] = field(default_factory=dict)  # version -> mode counts

    @property
    def empty(self) -> bool:
        return not any(self.counts.values())


def _ids(conn: duckdb.DuckDBPyConnection, query: str, params: Any = None) -> list[str]:
    return sorted({str(r[0]) for r in conn.execute(query, params).fetchall() if r[0] is not None})


def _request_ids_matching(conn: duckdb.DuckDBPyConnection, texts: list[str]) -> list[str]:
    """Events whose question, answer, documents or extra hold one of the texts (any case), and
    events whose sample's prompt or completion (a person's edit) holds one."""
    found: set[str] = set()
    for text in texts:
        needle = text.lower()
        found.update(
            _ids(
                conn,
                """
                SELECT request_id FROM raw_events WHERE contains(lower(question), $t)
                   OR contains(lower(answer), $t) OR contains(lower(docs::VARCHAR), $t)
                   OR contains(lower(coalesce(extra::VARCHAR, '')), $t)
                UNION ALL
                SELECT s.request_id FROM annotated_samples s LEFT JOIN completions c
                    USING (sample_id)
                WHERE contains(lower(s.prompt), $t)
                   OR contains(lower(coalesce(c.completion, '')), $t)
                """,
                {"t": needle},
            )
        )
    return sorted(found)


def _count(conn: duckdb.DuckDBPyConnection, query: str) -> int:
    ((count,),) = conn.execute(query).fetchall()
    return int(count)


# The cache entries holding the subject's text: answers equal to one of their completions or
# evaluation answers, entries holding a matched text, and the judge verdicts on any of those.
_CACHE = """
    WITH hit AS (
        SELECT cache_key FROM llm_cache WHERE content IN (
            SELECT completion FROM completions SEMI JOIN subject_samples USING (sample_id)
            WHERE completion IS NOT NULL
            UNION ALL SELECT candidate_answer FROM evaluation_items
                SEMI JOIN subject_samples USING (sample_id)
            UNION ALL SELECT baseline_answer FROM evaluation_items
                SEMI JOIN subject_samples USING (sample_id))
        OR EXISTS (
            SELECT 1 FROM subject_texts t WHERE contains(lower(content), t.text))
    )
    SELECT cache_key FROM hit
    UNION SELECT cache_key FROM llm_cache WHERE parent_key IN (SELECT cache_key FROM hit)
"""


def register_subject(
    conn: duckdb.DuckDBPyConnection, request_ids: list[str], texts: list[str]
) -> list[str]:
    """Make the subject readable by SQL on `conn` (subject_requests, subject_texts,
    subject_samples); returns the sample ids."""
    conn.register(
        "subject_requests",
        pl.DataFrame({"request_id": request_ids}, schema={"request_id": pl.String}),
    )
    conn.register(
        "subject_texts",
        pl.DataFrame({"text": [t.lower() for t in texts]}, schema={"text": pl.String}),
    )
    samples = _ids(
        conn,
        "SELECT sample_id FROM annotated_samples SEMI JOIN subject_requests USING (request_id)",
    )
    conn.register(
        "subject_samples", pl.DataFrame({"sample_id": samples}, schema={"sample_id": pl.String})
    )
    return samples


def find_subject(
    conn: duckdb.DuckDBPyConnection,
    *,
    request_ids: list[str] | None = None,
    texts: list[str] | None = None,
) -> Subject:
    """Everything the subject left, by request ids (each must be known) or by texts."""
    texts = [t for t in (texts or []) if t.strip()]
    ids = sorted(set(request_ids or []))
    if ids:
        known = set(
            _ids(
                conn,
                "SELECT request_id FROM raw_events WHERE request_id IN ? "
                "UNION SELECT request_id FROM rejected_events WHERE request_id IN ?",
                [ids, ids],
            )
        )
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ForgetError(
                f"unknown request id{'s' if len(unknown) > 1 else ''}: "
                f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''} "
                f"({len(unknown)} of {len(ids)}); nothing was changed"
            )
    ids = sorted(set(ids) | set(_request_ids_matching(conn, texts)))
    samples = register_subject(conn, ids, texts)
    rejected = """FROM rejected_events r
        WHERE r.request_id IN (SELECT request_id FROM subject_requests)
        OR EXISTS (SELECT 1 FROM subject_texts t WHERE contains(lower(r.payload), t.text))"""
    by_sample = "SEMI JOIN subject_samples USING (sample_id)"
    counts = {
        "raw_events": _count(
            conn, "SELECT count(*) FROM raw_events SEMI JOIN subject_requests USING (request_id)"
        ),
        "rejected_events": _count(conn, f"SELECT count(*) {rejected}"),
        "annotated_samples": len(samples),
        "completions": _count(conn, f"SELECT count(*) FROM completions {by_sample}"),
        "review_queue": _count(conn, f"SELECT count(*) FROM review_queue {by_sample}"),
        "llm_cache": _count(conn, f"SELECT count(*) FROM ({_CACHE})"),
        "evaluation_set": _count(conn, f"SELECT count(*) FROM evaluation_set {by_sample}"),
        "evaluation_items": _count(conn, f"SELECT count(*) FROM evaluation_items {by_sample}"),
    }
    membership = conn.execute(
        f"""
        SELECT d.version, list(d.sample_id ORDER BY d.sample_id) FROM dataset_samples d {by_sample}
        WHERE d.version NOT IN (SELECT version FROM version_supersessions)
        GROUP BY 1 ORDER BY 1
        """
    ).fetchall()
    versions = {str(v): list(s) for v, s in membership}
    counts["version_samples"] = sum(len(s) for s in versions.values())
    counts["versions"] = len(versions)
    modes = {}
    for version, mode, n in conn.execute(
        f"""SELECT d.version, c.mode, count(*) FROM dataset_samples d {by_sample}
        JOIN completions c USING (sample_id) GROUP BY 1, 2"""
    ).fetchall():
        modes.setdefault(str(version), {})[str(mode)] = int(n)
    published = [
        (str(v), str(d), str(s))
        for v, d, s in conn.execute(
            "SELECT version, destination, manifest_sha256 FROM version_publications "
            "WHERE status = 'published' AND version IN ? ORDER BY version",
            [list(versions) or [""]],
        ).fetchall()
    ]
    counts["published_copies"] = len(published)
    models = affected_models(conn, list(versions))
    counts["models"] = len(models)
    return Subject(ids, samples, counts, versions, published, models, modes)


def affected_models(
    conn: duckdb.DuckDBPyConnection, versions: list[str]
) -> list[tuple[str, str, str]]:
    """(model, version, reason) of models trained on one of the versions, and of the later
    models of the same backend (each round continues from the previous round's model)."""
    if not versions:
        return []
    rows = conn.execute(
        """
        WITH runs AS (
            SELECT r.model_id, r.dataset_version, r.backend, v.number FROM fine_tune_runs r
            JOIN dataset_versions v ON v.version = r.dataset_version
            WHERE r.status = 'succeeded' AND r.model_id IS NOT NULL
        ),
        first_hit AS (
            SELECT backend, min(number) AS number FROM runs WHERE dataset_version IN ?
            GROUP BY 1
        )
        SELECT DISTINCT r.model_id, r.dataset_version,
               CASE WHEN r.dataset_version IN ? THEN 'trained on an affected version'
                    ELSE 'continued from a model trained on an affected version' END
        FROM runs r JOIN first_hit f ON f.backend = r.backend AND r.number >= f.number
        ORDER BY 2, 1
        """,
        [versions, versions],
    ).fetchall()
    return [(str(m), str(v), str(reason)) for m, v, reason in rows]


# Lines of a split file read at once by `cut_superseding` (~3 KB each): memory is bounded by a
# chunk, not by the version's size. 500: 146 MB peak on a 21,615-sample version against 495 MB
# whole (2,000: 260 MB, no faster; docs/performance.md, "qe forget").
FORGET_CHUNK_LINES = 500


def _chunks(path: Path, lines: int) -> Iterator[list[bytes]]:
    """A split file in chunks of lines (none when the file does not exist: an empty split)."""
    return line_chunks(path, lines) if path.exists() else iter(())


def _text(lines: list[bytes]) -> list[str]:
    return [line.decode("utf-8").rstrip("\r\n") for line in lines]


@dataclass
class _SplitTally:
    samples: int = 0
    pairs: int = 0
    labels: dict[str, int] = field(default_factory=dict)


def _copy_split(
    writer: VersionWriter,
    files: VersionFiles,
    manifest: dict[str, Any],
    split: str,
    removed: set[str],
    chunk_lines: int,
) -> _SplitTally:
    """Stream one split of a version into `writer` without the removed samples: records and chat
    lines (the same samples in the same order) chunk by chunk, then the preference lines (trl and
    openai, the same pairs in the same order); a preference line goes with its sample: same
    prompt, chosen = its completion."""
    tally = _SplitTally()
    gone: set[tuple[str, str]] = set()
    records = _chunks(files.split_file(split, "records", manifest), chunk_lines)
    chat = _chunks(files.split_file(split, "chat", manifest), chunk_lines)
    for record_lines, chat_lines in zip(records, chat, strict=True):
        frame = pl.read_ndjson(b"".join(record_lines), infer_schema_length=None)
        keep = ~frame["sample_id"].is_in(list(removed))
        dropped = frame.filter(~keep)
        gone.update(zip(dropped["prompt"], dropped["completion"], strict=True))
        kept = frame.filter(keep)
        if not kept.height:
            continue
        lines = pl.Series("chat", _text(chat_lines), dtype=pl.String).filter(keep)
        writer.write(kept, lines, pl.Series("split", [split] * kept.height, dtype=pl.String))
        tally.samples += kept.height
        for label, n in kept.group_by("label").len().iter_rows():
            tally.labels[label] = tally.labels.get(label, 0) + n
    if not tally.samples:
        return tally  # nothing of the split is left: nor of its pairs
    trl = _chunks(files.split_file(split, "preference", manifest), chunk_lines)
    openai = _chunks(files.split_file(split, "openai_preference", manifest), chunk_lines)
    empty = pl.DataFrame(schema={"sample_id": pl.String})
    for trl_lines, openai_lines in zip(trl, openai, strict=True):
        trl_text = _text(trl_lines)
        keep_pair = [
            (line["prompt"][-1]["content"], line["chosen"][0]["content"]) not in gone
            for line in map(json.loads, trl_text)
        ]
        preference = pl.DataFrame(
            {"trl": trl_text, "openai": _text(openai_lines), "split": [split] * len(trl_text)},
            schema={"trl": pl.String, "openai": pl.String, "split": pl.String},
        ).filter(pl.Series(keep_pair, dtype=pl.Boolean))
        if preference.height:
            writer.write(
                empty, pl.Series("chat", [], pl.String), pl.Series([], dtype=pl.String), preference
            )
            tally.pairs += preference.height
    return tally


def cut_superseding(
    directory: Path,
    old: str,
    new: str,
    removed: list[str],
    modes_removed: dict[str, int],
    forget_id: str,
    chunk_lines: int = FORGET_CHUNK_LINES,
) -> tuple[dict[str, Any], int]:
    """Write version `new`: version `old`'s files without the removed samples (by stored or
    exported id), its manifest saying what it supersedes, under its temp name until the caller
    commits the row (`place_manifest`); returns (manifest, samples kept). Streams the split files
    in chunks of `chunk_lines` lines."""
    ids = set(removed) | set(exported_sample_ids(pl.Series(removed, dtype=pl.String)).to_list())
    files = VersionFiles.at(directory, old)
    old_manifest = json.loads(files.manifest.read_text("utf-8"))
    labels: dict[str, int] = {}
    splits: dict[str, int] = {}
    pairs = {s: 0 for s in SPLITS}
    with VersionWriter(directory, new) as writer:
        for split in SPLITS:
            tally = _copy_split(writer, files, old_manifest, split, ids, chunk_lines)
            if not tally.samples:
                continue
            splits[split] = tally.samples
            pairs[split] = tally.pairs
            for label, n in tally.labels.items():
                labels[label] = labels.get(label, 0) + n
        total = sum(splits.values())
        modes = {
            m: n - modes_removed.get(m, 0)
            for m, n in (old_manifest.get("completion_modes") or {}).items()
            if n - modes_removed.get(m, 0) > 0
        }
        preference = dict(old_manifest.get("preference") or {})
        preference.update({"pairs": sum(pairs.values()), **pairs})
        manifest = {
            **{k: v for k, v in old_manifest.items() if k not in ("files", "split_files")},
            "version": new,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "counts": {"samples": total, **{s: splits.get(s, 0) for s in SPLITS}},
            "label_counts": dict(sorted(labels.items(), key=lambda i: (-i[1], i[0]))),
            "completion_modes": modes,
            "split": {**old_manifest["split"], **{s: splits.get(s, 0) for s in SPLITS}},
            "preference": preference,
            "supersedes": {"version": old, "forget_id": forget_id, "removed_samples": len(removed)},
        }
        if total == 0:
            return manifest, 0
        return writer.publish(manifest, dataset_card), total


_REDACT = [
    f"""UPDATE raw_events SET question = '{FORGOTTEN}', answer = '{FORGOTTEN}', docs = [],
        checks = NULL, extra = NULL, evaluation = json_object('score', score, 'labels', labels)
        WHERE request_id IN (SELECT request_id FROM subject_requests)""",
    f"""UPDATE rejected_events SET payload = '{FORGOTTEN}'
        WHERE request_id IN (SELECT request_id FROM subject_requests)
           OR EXISTS (SELECT 1 FROM subject_texts t WHERE contains(lower(payload), t.text))""",
    f"""UPDATE annotated_samples SET question = '{FORGOTTEN}', original_answer = '{FORGOTTEN}',
        context_docs = [], instruction = '{FORGOTTEN}', prompt = '{FORGOTTEN}'
        WHERE sample_id IN (SELECT sample_id FROM subject_samples)""",
    # Out of every future cut: a forgotten sample is never exported again.
    f"""UPDATE completions SET completion = '{FORGOTTEN}', judge_verdict = NULL,
        status = 'rejected', error = 'forgotten'
        WHERE sample_id IN (SELECT sample_id FROM subject_samples)""",
    """UPDATE review_queue SET status = 'rejected', note = 'forgotten'
        WHERE sample_id IN (SELECT sample_id FROM subject_samples)""",
    """UPDATE evaluation_items SET candidate_answer = NULL, baseline_answer = NULL, reason = NULL
        WHERE sample_id IN (SELECT sample_id FROM subject_samples)""",
    "DELETE FROM evaluation_set WHERE sample_id IN (SELECT sample_id FROM subject_samples)",
]


@dataclass
class ForgetReport:
    forget_id: str | None  # None: a dry run
    subject: Subject
    superseding: dict[str, str | None]  # superseded version -> the version replacing it
    remote: list[str]  # what happened to published copies
    problems: list[str]  # published copies that could not be taken down (retried next time)


def _terms_digest(kind: str, terms: list[str]) -> str:
    return hashlib.sha256(json.dumps([kind, sorted(terms)]).encode("utf-8")).hexdigest()


def _commit(
    conn: duckdb.DuckDBPyConnection,
    subject: Subject,
    cuts: list[tuple[str, str | None, int, dict[str, Any] | None, VersionFiles | None]],
    audit: dict[str, Any],
) -> None:
    """One transaction: the superseding versions' rows, the supersessions, the tables' text,
    the cache, the model flags and the audit row."""
    with transaction(conn):
        for old, new, number, manifest, files in cuts:
            if new is not None and manifest is not None and files is not None:
                conn.execute(
                    "INSERT INTO dataset_versions SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "settings, max_completion_seq, now()::TIMESTAMP FROM dataset_versions "
                    "WHERE version = ?",
                    [
                        new,
                        number,
                        str(files.jsonl),
                        str(files.chat),
                        str(files.manifest),
                        manifest["counts"]["samples"],
                        manifest["counts"]["train"],
                        manifest["counts"]["validation"],
                        manifest["files"]["jsonl"]["sha256"],
                        manifest["files"]["chat"]["sha256"],
                        manifest["files"]["manifest"]["sha256"],
                        json.dumps(manifest["label_counts"], ensure_ascii=False),
                        old,
                    ],
                )
                conn.execute(
                    "INSERT INTO dataset_samples SELECT ?, sample_id, split FROM dataset_samples "
                    "WHERE version = ? AND sample_id NOT IN "
                    "(SELECT sample_id FROM subject_samples)",
                    [new, old],
                )
            conn.execute(
                "INSERT INTO version_supersessions VALUES (?, ?, ?, now()::TIMESTAMP)",
                [old, new, audit["forget_id"]],
            )
        conn.execute(f"DELETE FROM llm_cache WHERE cache_key IN (SELECT cache_key FROM ({_CACHE}))")
        for statement in _REDACT:
            conn.execute(statement)
        for model, version, reason in subject.models:
            conn.execute(
                "INSERT INTO flagged_models VALUES (?, ?, ?, ?, now()::TIMESTAMP) "
                "ON CONFLICT DO NOTHING",
                [model, version, audit["forget_id"], reason],
            )
        conn.execute(
            "INSERT INTO forget_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
            [
                audit["forget_id"],
                audit["matched_by"],
                audit["terms"],
                audit["terms_sha256"],
                json.dumps(subject.counts),
                json.dumps({old: new for old, new, *_ in cuts}),
                json.dumps([m for m, _, _ in subject.models]),
                audit["requested_by"],
            ],
        )


@dataclass(frozen=True)
class Takedowns:
    """What a pass over the superseded versions' published copies did: rows to record, and the
    stores that failed (their rows stay `published` and the next pass tries again)."""

    taken: list[tuple[str, str, str]]  # (version, destination, new status)
    problems: list[str]

    @property
    def done(self) -> list[str]:
        return [f"{version} at {where}: {status}" for version, where, status in self.taken]


def take_down(published: list[tuple[str, str, str]], delete: bool) -> Takedowns:
    """Unpublish (or delete) the published copies of superseded versions. Only the stores are
    touched: the caller records `taken` (`record_takedowns`), so slow stores never hold the
    writer lock unless the caller already does (`qe forget` does, to stay one step)."""
    taken, problems = [], []
    for version, destination, sha in published:
        try:
            unpublish(open_store(destination), version, sha, delete=delete)
        except PublishError as exc:
            problems.append(f"{version} not taken down: {exc}")
            continue
        taken.append((version, destination, "deleted" if delete else "unpublished"))
    return Takedowns(taken, problems)


def record_takedowns(conn: duckdb.DuckDBPyConnection, takedowns: Takedowns) -> None:
    for version, destination, status in takedowns.taken:
        conn.execute(
            "UPDATE version_publications SET status = ?, updated_at = now()::TIMESTAMP "
            "WHERE version = ? AND destination = ? AND status = 'published'",
            [status, version, destination],
        )


def pending_takedowns(conn: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    """Published copies of superseded versions: a store that was down when `qe forget` ran.
    `published_dataset` retries them on every run, `qe forget` on every call."""
    return [
        (str(v), str(d), str(s))
        for v, d, s in conn.execute(
            "SELECT version, destination, manifest_sha256 FROM version_publications "
            "WHERE status = 'published' AND version IN (SELECT version FROM version_supersessions) "
            "ORDER BY version, destination"
        ).fetchall()
    ]


def forget(
    database: Path,
    datasets_dir: Path,
    *,
    request_ids: list[str] | None = None,
    texts: list[str] | None = None,
    dry_run: bool = False,
    delete_remote: bool = False,
    requested_by: str = "unknown",
    config: dict[str, Any] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> ForgetReport:
    """Find the subject and, unless `dry_run`, forget them (see the module's docstring)."""
    if not request_ids and not [t for t in texts or [] if t.strip()]:
        raise ForgetError("give --request-id, --match or --from-file: nothing to look for")
    if dry_run:
        with connect(database, read_only=True) as conn:
            return ForgetReport(
                None, find_subject(conn, request_ids=request_ids, texts=texts), {}, [], []
            )
    forget_id = uuid.uuid4().hex[:16]
    kind = "request_id" if request_ids else "match"
    terms = list(request_ids or []) + list(texts or [])
    audit = {
        "forget_id": forget_id,
        "matched_by": "request_id+match" if request_ids and texts else kind,
        "terms": len(terms),
        "terms_sha256": _terms_digest(kind, terms),
        "requested_by": requested_by,
    }
    with writer_lock(database, on_wait=on_wait):
        with writer_connection(database, config=config) as conn:
            subject = find_subject(conn, request_ids=request_ids, texts=texts)
            if subject.empty:
                # Forgotten already (or never here): what an earlier forget left published (its
                # store was down) is still taken down, so running the same request again helps.
                takedowns = take_down(pending_takedowns(conn), delete_remote)
                record_takedowns(conn, takedowns)
                return ForgetReport(None, subject, {}, takedowns.done, takedowns.problems)
            state = version_state(conn)
            # Claimed like a cut's (dataset_version_claims): a name never stands for two
            # contents, even when this forget dies after its files took their names.
            numbers = range(state.next_number, state.next_number + len(subject.versions))
            for number in numbers:
                conn.execute(
                    "INSERT INTO dataset_version_claims VALUES (?, ?, now()::TIMESTAMP)",
                    [number, version_name(number)],
                )
            committed = dict(
                conn.execute("SELECT version, manifest_sha256 FROM dataset_versions").fetchall()
            )
        # A forget (or cut) that died between its commit and its manifest's rename: the manifest
        # takes its name first, or the removal below would take it for a dead cut's temp file.
        settle_manifests(datasets_dir, committed)
        # Files of a forget (or cut) that died before its commit.
        remove_uncommitted(datasets_dir, state.committed)
        cuts = []
        for number, (old, removed) in zip(numbers, subject.versions.items(), strict=True):
            new = version_name(number)
            manifest, kept = cut_superseding(
                datasets_dir, old, new, removed, subject.modes.get(old, {}), forget_id
            )
            if kept:
                cuts.append((old, new, number, manifest, VersionFiles.at(datasets_dir, new)))
            else:  # nothing of it is left: superseded by nothing (its number stays a gap)
                cuts.append((old, None, 0, None, None))
        with writer_connection(database, config=config) as conn:
            register_subject(conn, subject.request_ids, [t for t in texts or [] if t.strip()])
            _commit(conn, subject, cuts, audit)
            # Committed: each manifest takes its name (a crash before this leaves it under its
            # temp name, which the next cut's `settle_manifests` puts in place).
            for *_, files in cuts:
                if files is not None:
                    os.replace(manifest_temp(files), files.manifest)
                    fsync_dir(datasets_dir)
            takedowns = take_down(pending_takedowns(conn), delete_remote)
            record_takedowns(conn, takedowns)
    superseding = {o: n for o, n, *_ in cuts}
    return ForgetReport(forget_id, subject, superseding, takedowns.done, takedowns.problems)
