"""The local pipeline console: one line per step on the terminal, the detail in per-step logs."""
from __future__ import annotations

import io

from motioncharacter.pipelines.local_console import StepConsole

# what kfp.local prints for a run (colours included), shortened
KFP_OUTPUT = """\
23:01:02.100 - INFO - Running pipeline: \x1b[95m'motioncharacter'\x1b[0m
23:01:02.200 - INFO - Executing task \x1b[96m'prepare'\x1b[0m
23:01:02.201 - INFO - Streamed logs:

    [KFP Executor 2026-12-01 23:01:02,300 INFO]: Got executor_input:
    {"inputs": {"parameterValues": {"overrides": []}}}
    prepare: 12 inputs, 6 kept
23:01:40.000 - INFO - Task \x1b[96m'prepare'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
23:01:40.001 - INFO - Executing task \x1b[96m'train'\x1b[0m
    Traceback (most recent call last):
    RuntimeError: boom
23:01:50.000 - INFO - Task train failed (attempt 1/3). Retrying in 60.0s...
23:02:50.000 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_one_line_per_step_and_the_detail_in_step_logs(tmp_path):
    term = io.StringIO()
    c = StepConsole(tmp_path / "logs", term)
    for chunk in (KFP_OUTPUT[:37], KFP_OUTPUT[37:400], KFP_OUTPUT[400:]):  # writes split mid-line
        c.write(chunk)
    c.close()
    lines = term.getvalue().splitlines()
    assert lines[0] == "[prepare] running ..." and lines[1].startswith("[prepare] done in ")
    assert lines[2] == "[train] running ..."
    assert lines[3].startswith("[train] failed (try 1 of 3); retrying in 60 s; log: ")
    assert lines[4].startswith("[train] FAILURE after ") and lines[4].endswith(str(tmp_path / "logs" / "train.log"))
    assert len(lines) == 5 and c.failed == ["train"]
    assert "executor_input" not in term.getvalue()
    assert "Got executor_input" in (tmp_path / "logs" / "prepare.log").read_text()
    train = (tmp_path / "logs" / "train.log").read_text()
    assert "RuntimeError: boom" in train and "executor_input" not in train
    assert (tmp_path / "logs" / "pipeline.log").read_text() == KFP_OUTPUT  # everything, verbatim
