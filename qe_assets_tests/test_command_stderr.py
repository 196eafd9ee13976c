"""The `command` backend keeps every line its command writes to stderr, even one a child it
left behind writes after the command has exited (the copy used to close its log 5 s after the
exit, and the thread writing to it then died on the closed file, losing the line)."""

from __future__ import annotations

import time
from pathlib import Path

from qe_assets.settings import Settings
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_finetune import SCRIPTS, command_settings, processed


def test_a_line_written_after_the_command_exited_still_reaches_its_log(
    settings: Settings,
) -> None:
    configured = command_settings(settings, SCRIPTS / "pipes_late_stderr.py")
    processed(configured, 12)
    result = materialize(configured, selection=["tuning_dataset", "fine_tuned_model"])
    assert metadata(result, "fine_tuned_model")["status"] == "succeeded"
    (log,) = Path(configured.data_dir).glob("finetune/*/stderr.log")
    deadline = time.monotonic() + 15
    while "late-line-from-a-child" not in log.read_text("utf-8"):
        assert time.monotonic() < deadline, "the child's line never reached the log"
        time.sleep(0.2)
