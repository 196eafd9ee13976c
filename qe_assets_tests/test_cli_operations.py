"""`qe` as an operator uses it, beyond the happy path of test_cli.py.

Every command runs as a real subprocess (`python -m qe_assets.cli`) against real parts: the
session's `redis-server`, a DuckDB file in a temp dir, Dagster runs recorded in a temp
`DAGSTER_HOME`, and the local OpenAI-compatible server over HTTP. Covered here:

* `qe enqueue` onto Redis (valid lines on the list, bad ones as `file:line: reason`, exit 1),
  then `qe run` drains the list into `raw_events`;
* `--help` of every command and review action, and user mistakes: the README's exit codes,
  one `qe: …` line, never a traceback;
* `qe status` after an LLM-mode `qe run --cut-version`: token totals and estimated cost equal to
  what the server was sent and what DuckDB holds, and the fine-tune run of each version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis

from qe_assets.ops.demo import generate_events, write_jsonl
from qe_assets.settings import REDIS_LIST, Settings
from qe_assets.store import connect, ensure_schema
from qe_assets_tests.conftest import free_port
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.openai_server import (
    ChatRequest,
    OpenAIServer,
    default_answer,
    prompt_hash,
    word_count,
)
from qe_assets_tests.runs import materialize
from qe_assets_tests.test_llm import KEY, put

# A Redis database no other test module uses: the server is shared by the whole session, and
# `redis_url` only flushes database 0.
REDIS_DB = 7
# Prices chosen so the estimated cost is well above the 4 decimals `qe status` prints.
PRICE_IN, PRICE_OUT = 2.5, 10.0


def clean_environ() -> dict[str, str]:
    """The inherited environment without configuration that would leak into the runs (a
    developer's QE_* / OPENAI_* / DAGSTER_HOME must not point a test at real state)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QE_", "OPENAI_")) and k not in ("DAGSTER_HOME", "EDITOR", "VISUAL")
    }


def qe(
    *args: str, env: Mapping[str, str], code: int | None = 0
) -> subprocess.CompletedProcess[str]:
    """Run `qe ARGS`; `code` is the exit status expected (None: don't check)."""
    result = subprocess.run(
        [sys.executable, "-m", "qe_assets.cli", *args],
        env={**clean_environ(), **env},
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,  # a prompt sees end of input, as in CI, never the terminal
    )
    if code is not None and result.returncode != code:
        raise AssertionError(
            f"qe {' '.join(args)} exited {result.returncode}, expected {code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The README's promise for user mistakes: one line on stderr, no traceback."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qe: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def db_url(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


# ----- 1. qe enqueue onto Redis, then qe run ------------------------------------------------


def test_enqueue_onto_redis_reports_bad_lines_and_run_drains_the_list(
    tmp_path: Path, redis_url: str
) -> None:
    url = db_url(redis_url, REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()  # leftovers of an earlier test using the same database
    env = {"QE_DATA_DIR": str(tmp_path / "data"), "QE_QUEUE_URL": url}

    events = tmp_path / "events.jsonl"
    good = [line(make_event(f"redis-{i}")) for i in range(5)]
    content = [
        *good[:3],
        b"{broken",  # line 4
        b"",  # line 5: blank lines are skipped, but still counted for the line numbers
        line(make_event("too-high", evaluation={"score": 1.5, "labels": []})),  # line 6
        *good[3:],
        line(make_event("no-content", docs=[{"id": "d"}])),  # line 9
    ]
    events.write_bytes(b"\n".join(content) + b"\n")

    enqueued = qe("enqueue", str(events), env=env, code=1)
    assert "enqueued 5 records on the redis queue; 3 invalid" in enqueued.stdout
    # Each bad line is named by file and physical line number, with the field-naming reason.
    assert enqueued.stderr.splitlines() == [
        f"qe: {events}:4: payload: Invalid JSON: key must be a string at line 1 column 2",
        f"qe: {events}:6: evaluation.score: Input should be less than or equal to 1",
        f"qe: {events}:9: docs.0.content: Field required",
    ]
    # The valid lines are on the list producers use, in file order; nothing went to the inbox.
    assert client.llen(REDIS_LIST) == 5
    assert client.lrange(REDIS_LIST, 0, -1) == good
    assert not (tmp_path / "data" / "inbox").exists() or not any(
        (tmp_path / "data" / "inbox").glob("*.jsonl")
    )
    # The other databases of the shared server were not touched.
    assert redis.Redis.from_url(redis_url).llen(REDIS_LIST) == 0

    run = qe("run", env=env)
    assert "raw_events: new_rows=5, duplicates=0, rejected=0, queue_depth_left=0" in run.stdout
    with connect(tmp_path / "data" / "qe.duckdb", read_only=True) as conn:
        rows = conn.execute("SELECT request_id, source FROM raw_events ORDER BY 1").fetchall()
        rejected = conn.execute("SELECT count(*) FROM rejected_events").fetchall()[0][0]
    assert rows == [(f"redis-{i}", f"redis:{REDIS_LIST}") for i in range(5)]
    assert rejected == 0  # the invalid lines were reported, not forwarded (no --keep-invalid)
    # Drained and acknowledged: neither the list nor the consumer's processing list is left.
    assert client.llen(REDIS_LIST) == 0
    assert client.keys(f"{REDIS_LIST}*") == []


def test_enqueue_with_redis_down_exits_1_without_traceback(tmp_path: Path) -> None:
    # Nothing listens on a fresh free port: the connection is refused at once.
    env = {
        "QE_DATA_DIR": str(tmp_path / "data"),
        "QE_QUEUE_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    events = tmp_path / "events.jsonl"
    events.write_bytes(line(make_event("r-1")) + b"\n")
    down = qe("enqueue", str(events), env=env, code=1)
    assert_one_line_error(down, "unavailable")


# ----- 2. --help everywhere, and user mistakes --------------------------------------------

HELP_COMMANDS = [
    [],
    ["enqueue"],
    ["run"],
    ["sql"],
    ["status"],
    ["review"],
    ["review", "list"],
    ["review", "show"],
    ["review", "accept"],
    ["review", "edit"],
    ["review", "reject"],
    ["ui"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "qe")
def test_help_of_every_command_exits_0_with_usage(command: list[str], tmp_path: Path) -> None:
    # No database and no configuration are needed to read the help.
    result = qe(*command, "--help", env={"QE_DATA_DIR": str(tmp_path / "data")})
    assert result.stdout.startswith(f"usage: {' '.join(['qe', *command])}")
    assert "options:" in result.stdout and "-h, --help" in result.stdout
    assert result.stderr == ""


def test_top_level_help_lists_every_command_and_review_help_every_action(tmp_path: Path) -> None:
    env = {"QE_DATA_DIR": str(tmp_path / "data")}
    top = qe("--help", env=env).stdout
    for command in ("enqueue", "run", "sql", "status", "review", "ui"):
        assert re.search(rf"^\s+{command}\s+\S", top, re.MULTILINE), command
    review = qe("review", "--help", env=env).stdout
    for action in ("list", "show", "accept", "edit", "reject"):
        assert re.search(rf"^\s+{action}\s+\S", review, re.MULTILINE), action


@pytest.mark.parametrize(
    "args",
    [
        [],  # no command
        ["bogus"],
        ["sql"],  # the query is required
        ["review"],  # an action is required
        ["review", "list", "--status", "maybe"],
        ["review", "accept"],  # at least one sample id
        ["sql", "SELECT 1", "--format", "xml"],
        ["status", "--wait", "soon"],
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_bad_usage_exits_2_with_usage_and_no_traceback(args: list[str], tmp_path: Path) -> None:
    result = qe(*args, env={"QE_DATA_DIR": str(tmp_path / "data")}, code=2)
    assert result.stderr.startswith("usage: qe")
    assert "error:" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_user_mistakes_exit_with_documented_codes_one_line_no_traceback(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"QE_DATA_DIR": str(data)}

    # Before any database exists: bad usage (2), pointing at `qe run`.
    assert_one_line_error(qe("review", "show", "x", env=env, code=2), "qe run")

    # An empty store with the real schema (what `qe run` would create, without its start-up
    # cost): enough for queries and review lookups to fail for the user's reasons.
    with connect(Settings(data_dir=str(data)).database) as conn:
        ensure_schema(conn)

    # Query errors are 1 (README: "1 query error").
    assert_one_line_error(qe("sql", "SELEC bad", env=env, code=1), "syntax error")
    assert_one_line_error(
        qe("sql", "SELECT * FROM no_such_table", env=env, code=1), "no_such_table"
    )
    # A parquet export needs a file: bad usage.
    assert_one_line_error(qe("sql", "SELECT 1", "--format", "parquet", env=env, code=2), "--output")

    # Unknown samples are 1 (README: "1 unknown sample") for every review action.
    assert_one_line_error(
        qe("review", "show", "nonexistent", env=env, code=1), "no sample 'nonexistent'"
    )
    for action in ("accept", "reject"):
        result = qe("review", action, "nonexistent", "--reviewer", "ann", env=env, code=1)
        assert_one_line_error(result, "no sample 'nonexistent'")
    edit = qe("review", "edit", "nonexistent", "--completion", "better", env=env, code=1)
    assert_one_line_error(edit, "no sample 'nonexistent'")
    # An empty queue lists fine.
    assert qe("review", "list", env=env).returncode == 0

    # A bad configuration value is 2 and names the variable.
    bad_url = qe("status", env={**env, "QE_QUEUE_URL": "http://example.invalid/0"}, code=2)
    assert_one_line_error(bad_url, "configuration error", "QE_QUEUE_URL")
    bad_price = qe("status", env={**env, "QE_LLM_PRICE_INPUT_PER_1M": "cheap"}, code=2)
    assert_one_line_error(bad_price, "QE_LLM_PRICE_INPUT_PER_1M")


# ----- 3. qe status after an LLM-mode run and a cut version ---------------------------------


def completion_lines(status: str) -> dict[tuple[str, str], list[int]]:
    """`qe status`'s completions table: (mode, status) → samples, requests, tokens in, out."""
    found = {}
    for match in re.finditer(
        r"^  (\w+)\s+(\w+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", status, re.MULTILINE
    ):
        numbers = [int(g.replace(",", "")) for g in match.groups()[2:]]
        found[(match[1], match[2])] = numbers
    return found


def test_status_shows_llm_tokens_cost_and_the_fine_tune_run_of_each_version(
    tmp_path: Path, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), eval_share=0.0)
    env = {
        "QE_DATA_DIR": settings.data_dir,
        "QE_SPOT_CHECK_SHARE": "0",  # every sample goes to training: exact counts
        "QE_EVAL_SHARE": "0",
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": openai_server.base_url,
        "QE_LLM_MODEL": "test-model",
        "QE_LLM_MAX_RETRIES": "0",
        "QE_LLM_TIMEOUT_SECONDS": "20",
        "QE_LLM_PRICE_INPUT_PER_1M": str(PRICE_IN),
        "QE_LLM_PRICE_OUTPUT_PER_1M": str(PRICE_OUT),
    }
    # 12 train samples: above the 10 examples the blocking format check requires.
    put(settings, [f"topic{i}" for i in range(12)])
    run = qe("run", "--cut-version", env=env)
    assert "mode=llm, llm/calls=12" in run.stdout
    assert re.search(r"^tuning_dataset: .*version=v001, samples=12", run.stdout, re.MULTILINE)
    assert re.search(r"^fine_tuned_model: .*status=skipped", run.stdout, re.MULTILINE)
    # A second round, so `qe status` has a run per version to list. It runs in process (same
    # definitions, same settings, same DuckDB file) to spare a second `qe run` start-up; there is
    # one `qe status` at the end for the same reason (each one imports Dagster).
    put(settings, [f"later{i}" for i in range(10)])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # read by the resource when the run starts
    assert materialize(Settings.from_env(env)).success
    assert openai_server.chat_count == 22  # the first 12 were not asked again

    status = qe("status", env=env).stdout
    with connect(settings.database, read_only=True) as conn:
        ((samples, requests, tokens_in, tokens_out),) = conn.execute(
            "SELECT count(*), sum(attempts), sum(prompt_tokens), sum(completion_tokens) "
            "FROM completions WHERE mode = 'llm' AND status = 'ok'"
        ).fetchall()
        runs = conn.execute(
            "SELECT dataset_version, backend, status, message FROM fine_tune_runs ORDER BY 1 DESC"
        ).fetchall()
    # What the server was sent and answered is the ground truth for the token counts (the fake
    # server counts words as tokens and answers each prompt deterministically).
    sent_in = sent_out = 0
    for request in openai_server.chat_requests():
        messages = request.json()["messages"]
        sent_in += sum(word_count(m["content"]) for m in messages)
        prompt = messages[-1]["content"]
        answer = default_answer(ChatRequest({}, {}, prompt, prompt_hash(prompt), 1))
        sent_out += word_count(answer)
    assert (samples, requests) == (22, 22)
    assert (tokens_in, tokens_out) == (sent_in, sent_out) and tokens_in > 0 and tokens_out > 0

    # The per-mode table and the totals line, with the real numbers.
    assert completion_lines(status) == {("llm", "ok"): [22, 22, tokens_in, tokens_out]}
    cost = (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6
    assert cost >= 0.001  # visible at the 4 decimals printed
    assert f"LLM tokens {tokens_in:,} in / {tokens_out:,} out, estimated cost {cost:.4f}" in status
    assert re.search(r"latest dataset: v002 \(10 samples, \d{4}-\d\d-\d\d \d\d:\d\d UTC\)", status)
    assert "pending samples: 0 ready for the next version" in status

    # The fine-tune run of each version, newest version first, as recorded in fine_tune_runs.
    assert runs == [
        ("v002", "none", "skipped", "skipped: no backend configured"),
        ("v001", "none", "skipped", "skipped: no backend configured"),
    ]
    models = status.split("models (latest run per dataset version):\n", 1)[1].splitlines()
    assert models[:3] == [
        "  v002  none     skipped    skipped: no backend configured",
        "  v001  none     skipped    skipped: no backend configured",
        "queue (inbox): 0 pending",
    ]


def test_output_cut_short_by_the_reader_is_not_an_error(tmp_path: Path) -> None:
    # `qe sql … | head -1`: the pipe closes long before 200,000 lines are written.
    data = tmp_path / "data"
    with connect(Settings(data_dir=str(data)).database) as conn:
        ensure_schema(conn)
    cli = f"{sys.executable} -m qe_assets.cli"
    result = subprocess.run(
        [
            "bash",
            "-c",
            f'set -o pipefail; {cli} sql "SELECT range FROM range(200000)" --format csv | head -1',
        ],
        env={**clean_environ(), "QE_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "range\n"
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


# ----- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 60 MB tmpfs of its own, so the test can fill it without touching the machine's disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file taking all but `leave` bytes of the disk."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        while (free := shutil.disk_usage(disk).free) > leave:
            try:
                fh.write(b"\0" * min(1 << 20, free - leave))
                fh.flush()
            except OSError:
                break
    return filler


def test_run_on_a_full_disk_says_so_in_one_line_and_loses_nothing(small_disk: Path) -> None:
    data = small_disk / "data"
    env = {"QE_DATA_DIR": str(data)}
    first, second = generate_events(100, seed=4), generate_events(1_500, seed=5)
    write_jsonl(data / "inbox" / "first.jsonl", first)
    qe("run", "-q", env=env)
    write_jsonl(data / "inbox" / "second.jsonl", second)

    # No byte left: Dagster's own SQLite fails before any step ("disk I/O error").
    filler = fill(small_disk, leave=0)
    full = qe("run", "-q", env=env, code=1)
    assert_one_line_error(full, f"disk full at {data}", "free space and re-run")
    filler.unlink()
    # A little left: the instance records the run, DuckDB's commit of a batch fails in a step.
    filler = fill(small_disk, leave=1_500_000)
    mid_step = qe("run", "-q", env=env, code=1)
    assert mid_step.stderr.strip().splitlines()[-1].startswith(f"qe: disk full at {data}")
    filler.unlink()

    qe("run", "-q", env=env)
    with connect(data / "qe.duckdb", read_only=True) as conn:
        ((stored,),) = conn.execute("SELECT count(DISTINCT request_id) FROM raw_events").fetchall()
    assert stored == len({json.loads(text)["request_id"] for text in first + second})


def test_ui_keeps_the_review_page_on_loopback_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qe ui --host 0.0.0.0` without QE_SERVE_TOKEN: dagster gets the host, the review page
    stays on 127.0.0.1 (`qe serve` would refuse 0.0.0.0 and its exit would stop dagster) and
    one line says so; with a token both take the host."""
    import time
    import urllib.request

    from qe_assets.cli import _ui_review_command, build_parser

    port = free_port()
    args = build_parser().parse_args(["ui", "--host", "0.0.0.0", "--review-port", str(port)])
    monkeypatch.delenv("QE_SERVE_TOKEN", raising=False)
    command, notice = _ui_review_command(args)
    assert command[-4:] == ["--host", "127.0.0.1", "--port", str(port)]
    assert notice == (
        f"review page on 127.0.0.1:{port} only, not 0.0.0.0: set QE_SERVE_TOKEN (16+ "
        "characters) to serve it beyond this machine"
    )
    # The command runs: the page answers on loopback instead of exiting.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    env["QE_DATA_DIR"] = str(tmp_path / "data")
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, "qe serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/review.css") as r:
                    assert r.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "qe serve did not start"
                time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(timeout=15)
    monkeypatch.setenv("QE_SERVE_TOKEN", "a-token-of-enough-length-42")
    command, notice = _ui_review_command(args)
    assert command[-4:] == ["--host", "0.0.0.0", "--port", str(port)] and notice is None
