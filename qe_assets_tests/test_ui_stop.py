"""SIGTERM to `qe ui` stops everything it started (issue 26, item 9).

Before, `qe ui` passed SIGINT to `dagster dev` alone and SIGKILLed it after 30 s: the webserver
still listened and the daemon still fired sensors 150 s later. A real `qe ui` (dagster dev with
its webserver, daemon and code servers, and the review page of `qe serve`) is started, every
process it started is noted, `qe ui` gets one SIGTERM, and none of them may survive.
`qe ui` is started as a script's `qe ui &` starts it, with SIGINT ignored: dagster dev inherited
that and then ignored both SIGINT and SIGTERM (it maps one to the other), the likeliest way to
the issue's survivors.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

from qe_assets.cli import UI_STOP_SECONDS
from qe_assets_tests.conftest import free_port
from qe_assets_tests.dagster_dev import DagsterDev


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root` (pid -> command line)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def with_our_home(home: Path) -> list[str]:
    """Live processes whose environment names this test's DAGSTER_HOME: whatever `qe ui` started,
    however far it was reparented."""
    marker = f"DAGSTER_HOME={home}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and alive(int(entry.name)):
            found.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:120]!r}")
    return found


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_to_qe_ui_leaves_no_process_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    home = (data / "dagster_home").resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "DAGSTER_HOME"))}
    env["QE_DATA_DIR"] = str(data)
    dev = DagsterDev(home, env, tmp_path / "qe-ui.log")
    review_port = free_port()
    qe_ui = f"{sys.executable} -m qe_assets.cli ui --port {dev.port} --review-port {review_port}"
    try:
        # As `qe ui &` in a script starts it: with SIGINT ignored, which its children inherit
        # (dagster dev then ignored SIGINT and SIGTERM alike and never stopped).
        dev.start(command=["bash", "-c", f"trap '' INT; exec {qe_ui}"])
        assert dev.process is not None
        deadline = time.monotonic() + 20
        while not listening(review_port):
            assert time.monotonic() < deadline, "the review page never listened"
            time.sleep(0.2)
        with urllib.request.urlopen(f"{dev.url}/server_info", timeout=10) as info:
            assert info.status == 200
        started = descendants(dev.process.pid)
        commands = " ".join(started.values())
        for part in ("dagster dev", "dagster_webserver", "dagster._daemon", "code-server", "serve"):
            assert part in commands, f"{part!r} not among {commands}"

        stopping = time.monotonic()
        os.kill(dev.process.pid, signal.SIGTERM)
        exit_code = dev.process.wait(timeout=60)
        stopped_in = time.monotonic() - stopping
        # Nothing is given time to linger: what is alive now was left behind.
        survivors = {pid: cmd for pid, cmd in started.items() if alive(pid)}
        killed = [line for line in dev.log_tail(20_000).splitlines() if ": killed" in line]
        print(
            f"\nqe ui and {len(started)} processes below it stopped {stopped_in:.1f}s after "
            f"SIGTERM (exit {exit_code}); {killed or 'all stopped when interrupted'}"
        )
        assert not survivors, f"left running after qe ui exited: {survivors}"
        assert not with_our_home(home)
        assert not listening(dev.port) and not listening(review_port)
        assert stopped_in < UI_STOP_SECONDS + 15
    finally:
        dev.stop()
