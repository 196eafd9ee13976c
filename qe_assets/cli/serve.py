"""`qe serve` and `qe ui`: the local review pages and dashboards, and Dagster with them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from qe_assets.cli.common import EXIT_FAILED, EXIT_OK, UserError, _err
from qe_assets.settings import Settings


def _dagster_dev_command(host: str, port: int) -> list[str]:
    """`dagster dev` of this environment: the interpreter running `qe`, not a `dagster` looked up
    on PATH (none there on a fresh clone whose venv is not activated). The workspace file is
    the project's, wherever `qe ui` is started from."""
    import importlib.util

    for module, package in (("dagster", "dagster"), ("dagster_webserver", "dagster-webserver")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{package} is not installed in {sys.prefix}: run `make install`")
    workspace = Path(__file__).resolve().parents[1] / "workspace.yaml"
    location = (
        ["-w", str(workspace)]
        if workspace.is_file()
        else ["-m", "qe_assets.definitions", "-a", "defs"]
    )
    return [sys.executable, "-m", "dagster", "dev", "-h", host, "-p", str(port), *location]


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from qe_assets.lib.web_security import InsecureBind, require_safe_bind
    from qe_assets.settings import serve_token
    from qe_assets.web.app import create_app

    token = serve_token()
    try:
        require_safe_bind(args.host, token)
    except InsecureBind as exc:
        raise UserError(str(exc)) from exc
    app = create_app(settings, token=token, write_wait_seconds=args.write_wait)
    print(f"review page on http://{args.host}:{args.port}/review", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return EXIT_OK


def _ui_review_command(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The `qe serve` of `qe ui`, and a line to print when it cannot take the requested host.

    Beyond loopback the review page needs QE_SERVE_TOKEN (`qe serve` refuses otherwise, and its
    exit would stop dagster too): without one the page stays on 127.0.0.1, dagster keeps the
    host asked for."""
    from qe_assets.lib.web_security import is_loopback
    from qe_assets.settings import serve_token

    host, notice = args.host, None
    if not is_loopback(host) and serve_token() is None:
        host = "127.0.0.1"
        notice = (
            f"review page on 127.0.0.1:{args.review_port} only, not {args.host}: set "
            "QE_SERVE_TOKEN (16+ characters) to serve it beyond this machine"
        )
    command = [sys.executable, "-m", "qe_assets.cli", "serve", "--host", host]
    return [*command, "--port", str(args.review_port)], notice


def _ui_serve_url(review_host: str, review_port: int) -> str:
    """Where the review page of `qe ui` listens, for the dashboards links in the assets'
    metadata (an explicit QE_SERVE_URL, e.g. behind a proxy, wins)."""
    if os.environ.get("QE_SERVE_URL"):
        return os.environ["QE_SERVE_URL"]
    host = "127.0.0.1" if review_host in ("0.0.0.0", "::", "") else review_host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{review_port}"


# How long `qe ui` gives Dagster to stop on its own (as after Ctrl+C in a terminal) before it
# kills what is left of it. dagster dev itself waits up to 60 s for each service; it stopped in
# 4 to 10 s here on a loaded machine.
UI_STOP_SECONDS = 30.0


def _stop_process_groups(children: Sequence[subprocess.Popen[bytes]], gentle: float) -> None:
    """Stop each child and everything it started: SIGINT to its process group (what Ctrl+C in a
    terminal sends to the whole group), then SIGKILL to the group after `gentle` seconds.

    Signalling the child alone orphaned `dagster dev`'s webserver, daemon and code servers when
    it was killed: they kept the port and went on firing sensors (issue 26)."""
    import signal

    def group_alive(child: subprocess.Popen[bytes]) -> bool:
        child.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return False
        return child.returncode is None or _group_has_live_members(child.pid)

    for child in children:
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT)
    deadline = time.monotonic() + gentle
    while any(group_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    for child in children:
        if group_alive(child):
            what = " ".join(str(a) for a in child.args[2:4])  # "dagster dev", "qe_assets.cli serve"
            _err(f"{what} still running {gentle:.0f}s after the interrupt: killed")
            with suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _group_has_live_members(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running, zombies (exited, not yet reaped by
    their new parent) aside. Without /proc (not Linux) every member counts as running."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    """`dagster dev`, and beside it (unless --no-review) the review page of `qe serve`; both
    stop together: Ctrl+C, SIGTERM, or either one ending, ends the other and every process
    either one started."""
    import signal

    from qe_assets.ops.runner import prepare_dagster_home

    home = prepare_dagster_home(settings)
    # The code server must use this data directory whatever directory it starts in.
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "QE_DATA_DIR": str(Path(settings.data_dir).absolute()),
    }
    commands = [_dagster_dev_command(args.host, args.port)]
    print(f"DAGSTER_HOME={home}; UI on http://{args.host}:{args.port}", flush=True)
    if not args.no_review:
        review, notice = _ui_review_command(args)
        if notice:
            print(notice, flush=True)
        # The links in the metadata point at this review port, not the default one.
        env["QE_SERVE_URL"] = _ui_serve_url(review[review.index("--host") + 1], args.review_port)
        commands.insert(0, review)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Handlers of our own, installed before the children start: a child inherits an *ignored*
    # signal. Started in the background of a script (`qe ui &`), SIGINT is ignored, and dagster
    # dev (which maps SIGTERM to its SIGINT handler) then ignored both and never stopped.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    children: list[subprocess.Popen[bytes]] = []
    try:
        # Each child leads a process group of its own, so that stopping it reaches everything
        # it started (dagster dev's webserver, daemon, code servers and runs); a terminal's
        # Ctrl+C now reaches only `qe ui`, which passes it on.
        for command in commands:
            children.append(subprocess.Popen(command, env=env, start_new_session=True))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        # A second SIGTERM or Ctrl+C must not cut the stop short and orphan what is left.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_process_groups(children, UI_STOP_SECONDS)
    return max((child.returncode or 0) for child in children) and EXIT_FAILED
