"""End-to-end pipeline benchmark: `python -m qe_assets_bench.pipeline [--sizes 10000,100000]`.

Generates deterministic ~7.5 KB events (zh + en, `qe_assets.ops.demo` with the BENCH sizes) once per
size and measures, in the same run on the same input:

* (a) the seed article's pipeline, written here as the article describes it: SQLite `raw_events`
  with a `processed` flag, one INSERT + commit per event (an ingester loop), then
  `DatasetBuilder.process_batch` (newest 50 pending, ORDER BY timestamp DESC) in a loop until a
  batch processes 0. Events under the confidence gate are never marked processed, so the loop
  stalls once the 50 newest pending events are all low-confidence; the events left behind are
  reported. To price the seed's design doing all the work, the loop then continues with the gate
  bug fixed (skipped events marked processed too) until nothing is pending ("drain").
  When the projected time exceeds `--a-max-seconds`, (a) is measured at a smaller size and
  extrapolated (ingest linearly; the drain quadratically, as every batch scans the whole table).
* (b) a plain one-pass Python script: json.loads per line -> transform -> JSONL.
* (c) one DuckDB SQL pass: read_ndjson -> transform in SQL -> COPY TO (FORMAT JSON).
* (d) our own tables (`qe_assets.store.SCHEMA`, ZSTD) filled by DuckDB SQL alone, a statement per
  stage, under DuckDB's default memory limit: raw_events with fingerprints -> annotated_samples
  and the review queue -> naive completions -> dataset_samples and the two JSONL files. No
  validation, no Dagster, no Python per record: the floor of this design (a DuckDB store per
  stage) on this machine.
* ours: `qe run --cut-version` end to end in a fresh QE_DATA_DIR, as a subprocess.

Each measured program runs in its own process under `/usr/bin/time -v` (wall time from here,
peak RSS from "Maximum resident set size"). The transform of (b) and (c) is ours: labels trimmed,
lower-cased, Chinese aliases mapped, primary label by priority, top-3 documents by score (missing
= 0, ties in retrieval order) cut to 500 characters, instruction/prefix/headings from
`qe_assets/lib/templates/texts.json`, confidence = min(1, score * 1.5). It reports; it always exits
0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QE = Path(sys.executable).parent / "qe"
TIME = Path("/usr/bin/time")
SEED = 7
INCREMENTAL_SEED = 8
INCREMENTAL_EVENTS = 1000
CONFIDENCE_FACTOR = 1.5
MIN_CONFIDENCE = 0.6
TOP_K = 3
MAX_CHARS = 500
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")


# --------------------------------------------------------------------------------------------
# shared transform spec (read once by the parent, handed to the helpers as JSON)


def build_spec() -> dict[str, Any]:
    from qe_assets.ingest.events import KNOWN_LABELS, LABEL_ALIASES

    texts = json.loads((REPO / "qe_assets" / "lib" / "templates" / "texts.json").read_text("utf-8"))
    return {
        "known": list(KNOWN_LABELS),
        "aliases": dict(LABEL_ALIASES),
        "instructions": texts["instructions"],
        "prefixes": texts["naive_prefixes"],
        "prompt": texts["prompt"],
    }


def quote(text: str) -> str:
    """Document markers inside a document are broken up, as the pipeline does."""
    return text.replace("<<<", "< < <").replace(">>>", "> > >")


def transform(event: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """(b): one event -> one sample record, the same rules as the pipeline."""
    aliases = spec["aliases"]
    labels = []
    for raw in event["evaluation"].get("labels") or []:
        text = raw.strip().lower()
        if text:
            labels.append(aliases.get(text, text))
    label = next((k for k in spec["known"] if k in labels), labels[0] if labels else "unspecified")
    question = event["question"]
    lang = "zh" if HAN.search(question) else "en"
    docs = sorted(event.get("docs") or [], key=lambda d: -(d.get("score") or 0.0))[:TOP_K]
    heading = spec["prompt"][lang]
    instruction = spec["instructions"][lang]
    instruction = instruction.get(label, instruction["default"])
    block = "\n".join(
        f"{heading['document'].replace('{n}', str(n))} <<<{quote(d['content'][:MAX_CHARS])}>>>"
        for n, d in enumerate(docs, start=1)
    )
    prompt = (
        f"{block + chr(10) * 2 if docs else ''}{instruction}\n\n"
        f"{heading['question_heading']}\n{question}"
    )
    prefixes = spec["prefixes"][lang]
    score = event["evaluation"]["score"]
    confidence = round(min(1.0, score * CONFIDENCE_FACTOR), 6)
    return {
        "request_id": event["request_id"],
        "label": label,
        "language": lang,
        "prompt": prompt,
        "completion": prefixes.get(label, prefixes["default"]) + event["answer"],
        "confidence": confidence,
        "score": score,
        "route": "train" if confidence >= MIN_CONFIDENCE else "review",
    }


def anchor_b(src: Path, dst: Path, spec: dict[str, Any]) -> dict[str, Any]:
    count = 0
    with src.open(encoding="utf-8") as fin, dst.open("w", encoding="utf-8") as fout:
        for line in fin:
            if line.strip():
                fout.write(json.dumps(transform(json.loads(line), spec), ensure_ascii=False))
                fout.write("\n")
                count += 1
    return {"samples": count}


# --------------------------------------------------------------------------------------------
# (c) DuckDB


def _lit(text: str) -> str:
    """A SQL string literal; newlines become chr(10) concatenations."""
    parts = ["'" + p.replace("'", "''") + "'" for p in text.split("\n")]
    return " || chr(10) || ".join(parts)


def _by_lang_label(table: dict[str, dict[str, str]], label: str) -> str:
    arms = []
    for lang in ("zh", "en"):
        inner = " ".join(
            f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in table[lang].items() if k != "default"
        )
        arms.append(
            f"WHEN language = '{lang}' THEN CASE {label} {inner} "
            f"ELSE {_lit(table[lang]['default'])} END"
        )
    return "CASE " + " ".join(arms) + " END"


def _transform_sql(spec: dict[str, Any], source: str) -> str:
    """The shared transform as SQL over `source`, a relation of request_id, question, answer,
    score, raw_labels and docs (id, content, score); one row per sample, with its parts."""
    alias_case = " ".join(f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in spec["aliases"].items())
    norm = f"CASE lower(trim(l)) {alias_case} ELSE lower(trim(l)) END"
    primary = " ".join(f"WHEN list_contains(labels, '{k}') THEN '{k}'" for k in spec["known"])
    doc = {lang: _lit(spec["prompt"][lang]["document"]) for lang in ("zh", "en")}
    qh = {lang: _lit(spec["prompt"][lang]["question_heading"]) for lang in ("zh", "en")}
    return f"""
  WITH ev AS (
    SELECT *,
           list_filter(list_transform(coalesce(raw_labels, []), lambda l: {norm}),
                       lambda l: l <> '') AS labels,
           CASE WHEN regexp_matches(question, '\\p{{Han}}') THEN 'zh' ELSE 'en' END AS language,
           list_transform(
             list_sort(list_transform(coalesce(docs, []),
                       lambda d, i: {{k: -coalesce(d.score, 0.0), i: i, d: d}}))[1:{TOP_K}],
             lambda x: {{'id': x.d.id, 'content': substr(x.d.content, 1, {MAX_CHARS}),
                         'score': x.d.score}}) AS top
    FROM {source}
  ), lab AS (
    SELECT *, CASE {primary} ELSE coalesce(labels[1], 'unspecified') END AS label,
           round(least(1.0, score * {CONFIDENCE_FACTOR}), 6) AS confidence
    FROM ev
  ), ins AS (
    SELECT *, {_by_lang_label(spec["instructions"], "label")} AS instruction FROM lab
  )
  SELECT *,
         CASE WHEN len(top) > 0 THEN array_to_string(list_transform(top, lambda d, n:
                CASE language WHEN 'zh' THEN replace({doc["zh"]}, '{{n}}', n::VARCHAR)
                              ELSE replace({doc["en"]}, '{{n}}', n::VARCHAR) END
                || ' <<<' || replace(replace(d.content, '<<<', '< < <'), '>>>', '> > >')
                || '>>>'),
                chr(10)) || chr(10) || chr(10) ELSE '' END
           || instruction || chr(10) || chr(10)
           || CASE language WHEN 'zh' THEN {qh["zh"]} ELSE {qh["en"]} END
           || chr(10) || question AS prompt,
         {_by_lang_label(spec["prefixes"], "label")} || answer AS completion,
         CASE WHEN confidence >= {MIN_CONFIDENCE} THEN 'train' ELSE 'review' END AS route
  FROM ins
"""


# What (c) reads, and what (d) reads to fill raw_events.
_C_COLUMNS = (
    "{request_id: 'VARCHAR', question: 'VARCHAR', answer: 'VARCHAR', "
    "docs: 'STRUCT(id VARCHAR, content VARCHAR, score DOUBLE)[]', "
    "evaluation: 'STRUCT(score DOUBLE, labels VARCHAR[])'}"
)
_D_COLUMNS = (
    "{request_id: 'VARCHAR', question: 'VARCHAR', answer: 'VARCHAR', timestamp: 'VARCHAR', "
    "docs: 'STRUCT(id VARCHAR, content VARCHAR, score DOUBLE)[]', evaluation: 'JSON'}"
)


def _read_events(src: Path, columns: str) -> str:
    src_sql = str(src).replace("'", "''")
    return f"read_ndjson('{src_sql}', columns = {columns}, maximum_object_size = 67108864)"


def duckdb_sql(src: Path, dst: Path, spec: dict[str, Any]) -> str:
    source = (
        "(SELECT request_id, question, answer, evaluation.score AS score, "
        f"evaluation.labels AS raw_labels, docs FROM {_read_events(src, _C_COLUMNS)})"
    )
    dst_sql = str(dst).replace("'", "''")
    return f"""
COPY (
  SELECT request_id, label, language, prompt, completion, confidence, score, route
  FROM ({_transform_sql(spec, source)})
) TO '{dst_sql}' (FORMAT JSON)
"""


def anchor_c(src: Path, dst: Path, spec: dict[str, Any]) -> dict[str, Any]:
    import duckdb

    conn = duckdb.connect()
    try:
        conn.execute(f"SET temp_directory = '{dst.parent / 'duckdb_tmp'}'")
        result = conn.execute(duckdb_sql(src, dst, spec)).fetchall()
    finally:
        conn.close()
    return {"samples": int(result[0][0]) if result and result[0] else None}


# (d): our own tables (qe_assets.store.SCHEMA, the writers' settings), filled by DuckDB SQL alone,
# one statement per stage and no Python per record. It does less than ours (no per-field
# validation or reasons, no review or duplicate rules, no PII pass, no format checks, no Dagster)
# and may use DuckDB's default memory limit (80 % of RAM; one statement over 1M events does not
# fit in our 1 GB), so it bounds from below the time any implementation of this design needs.
_D_STAGES: tuple[tuple[str, str], ...] = (
    (
        "raw_events",
        """
        INSERT INTO raw_events (request_id, question, docs, answer, evaluation, score, labels,
                                checks, timestamp, extra, fingerprint, source, ingested_at)
        SELECT request_id, question,
               list_transform(docs, lambda d: {'id': d.id, 'content': d.content,
                                               'score': d.score, 'meta': NULL::VARCHAR}),
               answer, evaluation, (evaluation->>'score')::DOUBLE,
               coalesce((evaluation->'labels')::VARCHAR[], []), evaluation->'checks',
               coalesce(timestamp::TIMESTAMPTZ::TIMESTAMP, now()::TIMESTAMP), NULL,
               sha256(to_json({'request_id': request_id, 'question': question, 'docs': docs,
                               'answer': answer, 'evaluation': evaluation,
                               'timestamp': timestamp})),
               'inbox', now()::TIMESTAMP
        FROM {events}
        QUALIFY row_number() OVER (PARTITION BY request_id) = 1
        """,
    ),
    (
        "annotated_samples",
        """
        INSERT INTO annotated_samples (sample_id, request_id, event_seq, label, labels, language,
            question, original_answer, context_docs, instruction, prompt, score, confidence,
            route, route_reason, question_key, dedup_key, annotated_at)
        SELECT request_id || '#' || label, request_id, seq, label, labels, language, question,
               answer, list_transform(top, lambda d: {'id': d.id, 'content': d.content,
                                                      'score': d.score, 'meta': NULL}),
               instruction, prompt, score, confidence, route,
               CASE WHEN route = 'review' THEN 'confidence below the gate' END,
               md5(lower(trim(question))), md5(lower(trim(question)) || chr(31) || answer),
               now()::TIMESTAMP
        FROM ({samples});
        INSERT INTO review_queue (sample_id, reason, status, queued_at)
        SELECT sample_id, 'low_confidence', 'pending', now()::TIMESTAMP
        FROM annotated_samples WHERE route = 'review';
        """,
    ),
    (
        "completions",
        """
        INSERT INTO completions (sample_id, completion, mode, status, attempts, created_at,
                                 updated_at, seq)
        SELECT sample_id, {prefix} || original_answer, 'naive', 'ok', 0, now()::TIMESTAMP,
               now()::TIMESTAMP, seq
        FROM annotated_samples WHERE route = 'train'
        """,
    ),
    (
        "tuning_dataset",
        """
        INSERT INTO dataset_samples
        SELECT 'v001', sample_id,
               CASE WHEN ('0x' || substr(question_key, 1, 8))::UBIGINT % 100 < 10
                    THEN 'validation' ELSE 'train' END
        FROM completions JOIN annotated_samples USING (sample_id);
        COPY (SELECT a.sample_id, a.prompt, c.completion, a.label, a.confidence
              FROM completions c JOIN annotated_samples a USING (sample_id) ORDER BY c.seq)
        TO '{records}' (FORMAT JSON);
        COPY (SELECT [{'role': 'system', 'content': a.instruction},
                      {'role': 'user', 'content': a.prompt},
                      {'role': 'assistant', 'content': c.completion}] AS messages
              FROM completions c JOIN annotated_samples a USING (sample_id) ORDER BY c.seq)
        TO '{chat}' (FORMAT JSON);
        """,
    ),
)


def anchor_d(src: Path, dst: Path, spec: dict[str, Any]) -> dict[str, Any]:
    import duckdb

    from qe_assets.store import SCHEMA, WRITER_CONFIG

    database = dst.with_suffix(".duckdb")
    for leftover in dst.parent.glob(f"{database.name}*"):
        leftover.unlink()
    # raw_events' own columns under the names the shared transform reads.
    source = (
        "(SELECT request_id, seq, question, answer, score, labels AS raw_labels, docs "
        "FROM raw_events)"
    )
    fill = {
        "events": _read_events(src, _D_COLUMNS),
        "samples": _transform_sql(spec, source),
        "prefix": _by_lang_label(spec["prefixes"], "label"),
        "records": str(dst).replace("'", "''"),
        "chat": str(dst.with_suffix(".chat.jsonl")).replace("'", "''"),
    }
    stages: dict[str, float] = {}
    conn = duckdb.connect(str(database), config=dict(WRITER_CONFIG))
    try:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(SCHEMA)
        for stage, sql in _D_STAGES:
            started = time.perf_counter()
            for name, value in fill.items():
                sql = sql.replace("{" + name + "}", value)
            conn.execute(sql)
            stages[stage] = round(time.perf_counter() - started, 2)
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("raw_events", "annotated_samples", "completions", "dataset_samples")
        }
    finally:
        conn.close()
    dst.with_suffix(".chat.jsonl").unlink(missing_ok=True)
    return {
        "samples": counts["dataset_samples"],
        "counts": counts,
        "stages": stages,
        "db_bytes": database.stat().st_size,
    }


# --------------------------------------------------------------------------------------------
# (a) the seed article's pipeline (sections 2-5), in our code


SEED_LABEL_PRIORITY = ["factuality_error", "incomplete_answer", "low_relevance", "overconfidence"]


def seed_annotate(raw: dict[str, Any]) -> dict[str, Any]:
    """The article's annotate_event: English-only label priority, top-3 docs, confidence."""
    labels = raw["evaluation"].get("labels", [])
    label = "unspecified"
    if labels:
        label = next((p for p in SEED_LABEL_PRIORITY if p in labels), labels[0])
    # The article's `d.get("score", 0)` breaks on a null score; `or 0` keeps it running.
    docs = sorted(raw["docs"], key=lambda d: d.get("score") or 0, reverse=True)[:3]
    score = raw["evaluation"].get("score", 0.0)
    return {
        "sample_id": f"{raw['request_id']}_{label}",
        "question": raw["question"],
        "context_docs": docs,
        "original_answer": raw["answer"],
        "label": label,
        "instruction": f"请根据以下文档内容重新回答问题。({label})",
        "score": score,
        "confidence": min(1.0, score * 1.5),
    }


def seed_prompt(annotated: dict[str, Any]) -> str:
    ctx = "\n".join(
        f"[文档{i}] {d['content'][:500]}" for i, d in enumerate(annotated["context_docs"], 1)
    )
    return f"{ctx}\n\n{annotated['instruction']}\n\n# 问题\n{annotated['question']}"


def seed_completion(annotated: dict[str, Any]) -> str:
    prefix = {
        "factuality_error": "【纠正】根据文档内容,更正之前回答中的事实性错误:",
        "incomplete_answer": "【补充】在之前回答的基础上补充更多关键信息:",
        "overconfidence": "【调整】用更谨慎的语气重新表述:",
    }.get(annotated["label"], "【重述】根据文档重新回答:")
    return prefix + annotated["original_answer"]


class DatasetBuilder:
    def __init__(self, conn: sqlite3.Connection, output_path: Path, mark_skipped: bool) -> None:
        self.conn = conn
        self.output_path = output_path
        self.mark_skipped = mark_skipped  # False = the article; True = its starvation bug fixed

    def fetch_pending_events(self, limit: int = 100) -> list[dict[str, Any]]:
        cur = self.conn.cursor()
        cur.execute(
            "SELECT request_id, question, docs, answer, evaluation FROM raw_events "
            "WHERE processed = FALSE ORDER BY timestamp DESC LIMIT ?",
            (limit,),
        )
        return [
            {
                "request_id": r[0],
                "question": r[1],
                "docs": json.loads(r[2]),
                "answer": r[3],
                "evaluation": json.loads(r[4]),
            }
            for r in cur.fetchall()
        ]

    def mark_processed(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        cur = self.conn.cursor()
        cur.executemany(  # the article's own code: one UPDATE per id, one commit per batch
            "UPDATE raw_events SET processed = TRUE WHERE request_id = ?",
            [(rid,) for rid in request_ids],
        )
        self.conn.commit()

    def process_batch(self, min_confidence: float = 0.6) -> tuple[int, int]:
        events = self.fetch_pending_events(limit=50)
        if not events:
            return 0, 0
        processed_ids, skipped_ids = [], []
        with self.output_path.open("a", encoding="utf-8") as f:
            for ev in events:
                annotated = seed_annotate(ev)
                if annotated["confidence"] < min_confidence:
                    skipped_ids.append(ev["request_id"])
                    continue
                record = {
                    "prompt": seed_prompt(annotated),
                    "completion": seed_completion(annotated),
                    "label": annotated["label"],
                    "confidence": annotated["confidence"],
                    "score": annotated["score"],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                processed_ids.append(ev["request_id"])
        self.mark_processed(processed_ids + (skipped_ids if self.mark_skipped else []))
        return len(processed_ids), len(events)


def anchor_a(src: Path, dst: Path, drain_seconds: float) -> dict[str, Any]:
    db = dst.with_suffix(".sqlite")
    for stale in (db, dst):
        stale.unlink(missing_ok=True)
    conn = sqlite3.connect(db)
    conn.execute(
        """CREATE TABLE raw_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT UNIQUE,
            question TEXT,
            docs TEXT,
            answer TEXT,
            evaluation TEXT,
            timestamp DATETIME,
            processed BOOLEAN DEFAULT FALSE)"""
    )
    conn.commit()
    # The ingester: one event at a time, one INSERT, one commit (no executemany).
    t0 = time.perf_counter()
    lines = 0
    with src.open(encoding="utf-8") as fin:
        for line in fin:
            ev = json.loads(line)
            conn.execute(
                "INSERT OR IGNORE INTO raw_events "
                "(request_id, question, docs, answer, evaluation, timestamp) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    ev["request_id"],
                    ev["question"],
                    json.dumps(ev["docs"], ensure_ascii=False),
                    ev["answer"],
                    json.dumps(ev["evaluation"], ensure_ascii=False),
                    ev.get("timestamp"),
                ),
            )
            conn.commit()
            lines += 1
    ingest_s = time.perf_counter() - t0
    stored = conn.execute("SELECT count(*) FROM raw_events").fetchone()[0]

    # process_batch as written, until a batch processes 0.
    builder = DatasetBuilder(conn, dst, mark_skipped=False)
    t0 = time.perf_counter()
    written = batches = 0
    while True:
        n, _ = builder.process_batch()
        batches += 1
        written += n
        if n == 0:
            break
    loop_s = time.perf_counter() - t0
    left = conn.execute("SELECT count(*) FROM raw_events WHERE processed = FALSE").fetchone()[0]
    # Starved events that would have passed the gate: never reached behind the stuck batch.
    starved = 0
    for (evaluation,) in conn.execute("SELECT evaluation FROM raw_events WHERE processed = FALSE"):
        if min(1.0, json.loads(evaluation).get("score", 0.0) * 1.5) >= MIN_CONFIDENCE:
            starved += 1

    # Drain: the same loop with the bug fixed, time-capped; per-batch cost is a full scan.
    fixed = DatasetBuilder(conn, dst, mark_skipped=True)
    t0 = time.perf_counter()
    drained_events = drained_batches = 0
    capped = False
    while True:
        written_now, seen = fixed.process_batch()
        if seen == 0:
            break
        written += written_now
        drained_events += seen
        drained_batches += 1
        if time.perf_counter() - t0 > drain_seconds:
            capped = True
            break
    drain_s = time.perf_counter() - t0
    remaining = conn.execute("SELECT count(*) FROM raw_events WHERE processed = FALSE").fetchone()[
        0
    ]
    conn.close()
    drain_total = drain_s
    if capped and drained_events:
        drain_total = drain_s + drain_s / drained_events * remaining
    return {
        "lines": lines,
        "stored": stored,
        "ingest_s": ingest_s,
        "loop_s": loop_s,
        "loop_batches": batches,
        "left_unprocessed": left,
        "starved_good": starved,
        "drain_s": drain_s,
        "drain_total_s": drain_total,
        "drain_capped": capped,
        "drain_remaining": remaining,
        "samples": written,
        "db_bytes": db.stat().st_size,
    }


# --------------------------------------------------------------------------------------------
# measurement plumbing


def _rss_kb(stderr: str) -> int | None:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(match.group(1)) if match else None


def measured(cmd: list[str], *, env: dict[str, str] | None = None, log: Path) -> dict[str, Any]:
    """Run cmd in a fresh process (under /usr/bin/time -v when present)."""
    full = [str(TIME), "-v", *cmd] if TIME.exists() else cmd
    # The step before may have left hundreds of MB of dirty pages: written back during this one,
    # they would slow its fsyncs and bill it for the other's output.
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(full, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(
        f"$ {' '.join(full)}\n--- rc {proc.returncode}\n--- stdout\n{proc.stdout}"
        f"\n--- stderr\n{proc.stderr}",
        encoding="utf-8",
    )
    rss = _rss_kb(proc.stderr)
    return {
        "wall": wall,
        "rss_mb": rss / 1024 if rss else None,
        "rc": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }


def run_anchor(kind: str, src: Path, dst: Path, spec_path: Path, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qe_assets_bench.pipeline", "--_anchor", kind]
    cmd += ["--_input", str(src), "--_output", str(dst), "--_spec", str(spec_path)]
    if "drain_seconds" in extra:
        cmd += ["--_drain-seconds", str(extra["drain_seconds"])]
    res = measured(cmd, log=dst.with_suffix(".log"))
    result: dict[str, Any] = {"wall": res["wall"], "rss_mb": res["rss_mb"], "rc": res["rc"]}
    if res["rc"] == 0:
        last = [ln for ln in res["stdout"].splitlines() if ln.startswith("{")]
        result.update(json.loads(last[-1]))
    else:
        tail = res["stderr"].strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
    return result


def qe_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "OPENAI_", "DAGSTER_"))}
    env.update(
        QE_DATA_DIR=str(data_dir),
        DAGSTER_HOME=str(data_dir / "dagster_home"),
        QE_FINETUNE_THRESHOLD=str(10**12),
        QE_FINETUNE_BACKEND="none",
    )
    return env


def place_in_inbox(src: Path, data_dir: Path) -> None:
    inbox = data_dir / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, inbox / src.name)


def run_ours(src: Path, data_dir: Path, log: Path) -> dict[str, Any]:
    place_in_inbox(src, data_dir)
    res = measured([str(QE), "run", "--cut-version"], env=qe_env(data_dir), log=log)
    out: dict[str, Any] = {"wall": res["wall"], "rss_mb": res["rss_mb"], "rc": res["rc"]}
    out["summary"] = [ln for ln in res["stdout"].splitlines() if ln.strip()]
    if res["rc"] != 0:
        out["error"] = " | ".join(res["stderr"].strip().splitlines()[-3:])
    # The records file only: a version also writes .chat.jsonl and .preference.jsonl.
    records = sorted(
        v
        for v in (data_dir / "datasets").glob("rag_quality_tuning_v*.jsonl")
        if v.name.count(".") == 1
    )
    out["samples"] = sum(1 for _ in records[-1].open("rb")) if records else 0
    out["version"] = records[-1].name if records else None
    return out


def generate(path: Path, n: int, seed: int, start: datetime | None = None) -> float:
    from qe_assets.ops.demo import (
        BENCH_DOC_CHARS,
        BENCH_DOCS_PER_EVENT,
        generate_events,
        write_jsonl,
    )

    if path.exists():
        return path.stat().st_size / max(n, 1)
    lines = generate_events(
        n,
        seed=seed,
        docs_per_event=BENCH_DOCS_PER_EVENT,
        doc_chars=BENCH_DOC_CHARS,
        start=start,
    )
    write_jsonl(path, lines)
    return path.stat().st_size / max(n, 1)


def machine() -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"date    : {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"machine : {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {mem} RAM, "
        f"{model}",
        f"system  : {platform.platform()}, Python {platform.python_version()}, "
        f"load average at start {load}",
    ]


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# --------------------------------------------------------------------------------------------


def helper(args: argparse.Namespace) -> int:
    src, dst = Path(args._input), Path(args._output)
    spec = json.loads(Path(args._spec).read_text("utf-8"))
    if args._anchor == "a":
        result = anchor_a(src, dst, args._drain_seconds)
    elif args._anchor == "b":
        result = anchor_b(src, dst, spec)
    elif args._anchor == "c":
        result = anchor_c(src, dst, spec)
    else:
        result = anchor_d(src, dst, spec)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qe_assets_bench.pipeline")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated event counts")
    parser.add_argument("--million", action="store_true", help="add 1,000,000 to the sizes")
    parser.add_argument("--out", type=Path, help="work directory (default: a temp dir, removed)")
    parser.add_argument(
        "--a-max-seconds",
        type=float,
        default=300.0,
        help="run (a) in full only where its projected time is below this; else extrapolate",
    )
    parser.add_argument("--a-drain-seconds", type=float, default=60.0)
    parser.add_argument("--_anchor", choices=("a", "b", "c", "d"), help=argparse.SUPPRESS)
    parser.add_argument("--_input", help=argparse.SUPPRESS)
    parser.add_argument("--_output", help=argparse.SUPPRESS)
    parser.add_argument("--_spec", help=argparse.SUPPRESS)
    parser.add_argument("--_drain-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._anchor:
        return helper(args)

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if args.million:
        sizes = sorted({*sizes, 1_000_000})
    started = time.perf_counter()
    own_tmp = args.out is None
    out = Path(tempfile.mkdtemp(prefix="qe_bench_")) if own_tmp else args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    header = machine()
    for line in header:
        print(line, flush=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(build_spec(), ensure_ascii=False), encoding="utf-8")

    rows: dict[int, dict[str, Any]] = {}
    a_rate: dict[str, Any] | None = None  # (a) measured at a smaller size, for extrapolation
    if True:
        for n in sizes:
            row: dict[str, Any] = {}
            src = out / f"events_{n}.jsonl"
            t0 = time.perf_counter()
            row["bytes_per_event"] = generate(src, n, SEED)
            row["mb"] = src.stat().st_size / 1e6
            print(
                f"[{n}] input {row['mb']:,.0f} MB ({row['bytes_per_event']:,.0f} B/event), "
                f"generated in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )

            projected = None
            if a_rate is not None:
                scale = n / a_rate["n"]
                projected = a_rate["ingest_s"] * scale + a_rate["drain_total_s"] * scale**2
            if projected is None or projected <= args.a_max_seconds:
                print(f"[{n}] (a) seed pipeline ...", flush=True)
                a = run_anchor(
                    "a", src, out / f"a_{n}.jsonl", spec_path, drain_seconds=args.a_drain_seconds
                )
                a["extrapolated"] = False
                if a.get("rc") == 0:
                    a["total"] = a["ingest_s"] + a["loop_s"] + a["drain_total_s"]
                    a_rate = {"n": n, **a}
            else:
                scale = n / a_rate["n"]
                a = {
                    "extrapolated": True,
                    "from_n": a_rate["n"],
                    "ingest_s": a_rate["ingest_s"] * scale,
                    "drain_total_s": a_rate["drain_total_s"] * scale**2,
                    "total": projected,
                }
            row["a"] = a
            print(f"[{n}] (b) plain Python ...", flush=True)
            row["b"] = run_anchor("b", src, out / f"b_{n}.jsonl", spec_path)
            print(f"[{n}] (c) DuckDB SQL ...", flush=True)
            row["c"] = run_anchor("c", src, out / f"c_{n}.jsonl", spec_path)
            print(f"[{n}] (d) our tables by DuckDB SQL alone ...", flush=True)
            row["d"] = run_anchor("d", src, out / f"d_{n}.jsonl", spec_path)
            print(f"[{n}] ours: qe run --cut-version ...", flush=True)
            data_dir = out / f"qe_{n}"
            shutil.rmtree(data_dir, ignore_errors=True)
            row["ours"] = run_ours(src, data_dir, out / f"ours_{n}.log")
            rows[n] = row
            for key in ("b", "c", "d"):
                (out / f"{key}_{n}.jsonl").unlink(missing_ok=True)
            (out / f"d_{n}.duckdb").unlink(missing_ok=True)

        # Incremental: 1k new events on the largest store vs on an empty store.
        big = sizes[-1]
        inc_src = out / f"events_inc_{INCREMENTAL_EVENTS}.jsonl"
        generate(inc_src, INCREMENTAL_EVENTS, INCREMENTAL_SEED, start=datetime(2027, 6, 1))
        print(f"incremental: {INCREMENTAL_EVENTS} new events on an empty store ...", flush=True)
        empty_dir = out / "qe_inc_empty"
        shutil.rmtree(empty_dir, ignore_errors=True)
        inc_empty = run_ours(inc_src, empty_dir, out / "ours_inc_empty.log")
        print(
            f"incremental: {INCREMENTAL_EVENTS} new events on the {big:,}-event store ...",
            flush=True,
        )
        inc_full = run_ours(inc_src, out / f"qe_{big}", out / "ours_inc_full.log")

    total = time.perf_counter() - started
    print()
    print("=" * 100)
    for line in header:
        print(line)
    print(
        f"events  : qe_assets.ops.demo.generate_events(seed={SEED}, BENCH sizes), no malformed "
        "lines, ~2% re-sends"
    )
    print("note    : other processes (test suites) may be running on this machine")
    print()
    head = (
        f"{'events':>9} | {'step':<38} | {'wall s':>9} | {'peak RSS MB':>11} | {'ev/s':>9} | notes"
    )
    print(head)
    print("-" * len(head))
    for n, row in rows.items():
        a, b, c, d, ours = row["a"], row["b"], row["c"], row["d"], row["ours"]

        def line(step: str, wall: float | None, rss: float | None, note: str, n: int = n) -> None:
            rate = f"{n / wall:,.0f}" if wall else "-"
            print(
                f"{n:>9,} | {step:<38} | {fmt_s(wall):>9} | {fmt_mb(rss):>11} | {rate:>9} | {note}"
            )

        print(f"{'':>9} | input {row['mb']:,.0f} MB, {row['bytes_per_event']:,.0f} B/event")
        if a.get("extrapolated"):
            line(
                "(a) seed, EXTRAPOLATED",
                a["total"],
                None,
                f"from {a['from_n']:,}: ingest {fmt_s(a['ingest_s'])} s (x N), drain "
                f"{fmt_s(a['drain_total_s'])} s (x N^2)",
            )
        elif a.get("rc") == 0:
            line(
                "(a) seed: ingest, 1 INSERT+commit/event",
                a["ingest_s"],
                None,
                f"{a['stored']:,} rows, sqlite {a['db_bytes'] / 1e6:,.0f} MB",
            )
            line(
                "(a) seed: process_batch loop as written",
                a["loop_s"],
                None,
                f"{a['loop_batches']} batches, stalls; LEFT UNPROCESSED {a['left_unprocessed']:,}"
                f" ({a['starved_good']:,} of them >= gate, starved)",
            )
            drain_note = (
                f"{'CAPPED, extrapolated' if a['drain_capped'] else 'complete'}: measured "
                f"{fmt_s(a['drain_s'])} s, {a['drain_remaining']:,} left at cap"
            )
            line("(a) seed: drain, gate bug fixed", a["drain_total_s"], None, drain_note)
            line(
                "(a) seed total (ingest+loop+drain)",
                a["total"],
                a["rss_mb"],
                f"wall of the helper {fmt_s(a['wall'])} s",
            )
        else:
            line("(a) seed", None, a.get("rss_mb"), f"FAILED: {a.get('error')}")
        line(
            "(b) plain Python one pass",
            b["wall"],
            b["rss_mb"],
            f"{b.get('samples', 0):,} samples" if b["rc"] == 0 else f"FAILED: {b.get('error')}",
        )
        line(
            "(c) DuckDB SQL one pass (floor)",
            c["wall"],
            c["rss_mb"],
            f"{c.get('samples') or 0:,} samples" if c["rc"] == 0 else f"FAILED: {c.get('error')}",
        )
        d_note = (
            f"{d.get('samples') or 0:,} samples; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in d.get("stages", {}).items())
            if d["rc"] == 0
            else f"FAILED: {d.get('error')}"
        )
        line("(d) our tables, DuckDB SQL alone", d["wall"], d["rss_mb"], d_note)
        ours_note = (
            f"{ours['samples']:,} samples in {ours['version']}"
            if ours["rc"] == 0
            else f"FAILED rc={ours['rc']}: {ours.get('error')}"
        )
        line("ours: qe run --cut-version", ours["wall"], ours["rss_mb"], ours_note)
        if ours["rc"] == 0 and c["rc"] == 0:
            r1 = ours["wall"] / c["wall"]
            verdict = ("PASS" if r1 <= 3 else "MISS") if n >= 100_000 else "(target at 100k)"
            print(f"{'':>9} | ratio ours / (c) = {r1:,.2f}  target <= 3 at 100k: {verdict}")
        if ours["rc"] == 0 and c["rc"] == 0 and d["rc"] == 0:
            print(
                f"{'':>9} | ratio (d) / (c) = {d['wall'] / c['wall']:,.2f}  (the floor of our "
                f"tables); ours / (d) = {ours['wall'] / d['wall']:,.2f}"
            )
        if ours["rc"] == 0 and a.get("total"):
            r2 = a["total"] / ours["wall"]
            label = "extrapolated (a)" if a.get("extrapolated") else "measured (a)"
            print(
                f"{'':>9} | ratio (a) / ours = {r2:,.1f}  target >= 100: "
                f"{'PASS' if r2 >= 100 else 'MISS'} ({label})"
            )
        print("-" * len(head))
    print(f"incremental, {INCREMENTAL_EVENTS:,} new events, qe run --cut-version:")
    print(
        f"  on an empty store          : {fmt_s(inc_empty['wall'])} s, peak RSS "
        f"{fmt_mb(inc_empty['rss_mb'])} MB, rc {inc_empty['rc']}, {inc_empty['samples']:,} "
        f"samples in {inc_empty['version']}"
    )
    print(
        f"  on the {big:,}-event store : {fmt_s(inc_full['wall'])} s, peak RSS "
        f"{fmt_mb(inc_full['rss_mb'])} MB, rc {inc_full['rc']}, {inc_full['samples']:,} "
        f"samples in {inc_full['version']}"
    )
    if inc_empty["rc"] == 0 and inc_full["rc"] == 0:
        r3 = inc_full["wall"] / inc_empty["wall"]
        print(f"  ratio = {r3:,.2f}  target <= 1.5: {'PASS' if r3 <= 1.5 else 'MISS'}")
    for name, res in (("empty", inc_empty), ("full", inc_full)):
        if res["rc"] != 0:
            print(f"  {name} store run FAILED: {res.get('error')}")
    print(
        f"total benchmark runtime: {total:,.0f} s; work dir {out}{' (removed)' if own_tmp else ''}"
    )
    if own_tmp:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
