"""`make run`'s console (pipelines/console.py): kfp.local's output, as it writes it, goes to the log whole; the
terminal gets task lines, a training bar and a failed task's tail."""

import io
import sys
from pathlib import Path

from pipelines.console import PipelineConsole, console
from pipelines.local import summary_lines

CYAN, GREEN, RED, RESET = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"


def _kfp(task: str, status: str, body: str) -> str:
    """One task as kfp.local prints it (colours included), with ``body`` as its streamed output."""
    colour = GREEN if status == "SUCCESS" else RED
    return (
        f"02:40:01.001 - INFO - Executing task {CYAN}'{task}'{RESET}\n"
        f"02:40:01.002 - INFO - Streamed logs:\n\n{body}\n"
        f"02:40:09.100 - INFO - Task {CYAN}'{task}'{RESET} finished with status {colour}{status}{RESET}\n"
        f"02:40:09.101 - INFO - Task {CYAN}'{task}'{RESET} outputs:\n    Output: true\n" + "-" * 80 + "\n"
    )


def test_terminal_gets_task_lines_and_quarter_progress_the_log_everything() -> None:
    log, terminal = io.StringIO(), io.StringIO()
    stream = PipelineConsole(log, terminal)
    bars = "".join(
        f"\r    train unexrl-cic:  {p}%|###  | {p * 50}/5000 [00:07<00:23, 170.74it/s, q=1.29, val=1183s]"
        for p in range(0, 101, 10)
    )
    text = _kfp("simulate-logs", "SUCCESS", "    " + '{"executor_input": {"inputs": {}}}\n' * 30) + _kfp(
        "train", "SUCCESS", bars + "\n    checkpoint saved"
    )
    for i in range(0, len(text), 37):  # in pieces that split lines, as a pipe delivers them
        stream.write(text[i : i + 37])
    shown = terminal.getvalue().splitlines()
    assert log.getvalue() == text
    assert [line.split()[:2] for line in shown if "train unexrl-cic [" not in line] == [
        ["simulate-logs", "started"],
        ["simulate-logs", "SUCCESS"],
        ["train", "started"],
        ["train", "SUCCESS"],
    ]
    progress = [line for line in shown if "train unexrl-cic [" in line]
    assert len(progress) == 5  # 0%, 25%, 50%, 75%, 100% on a stream that is not a terminal
    assert progress[-1].split("]")[1].split() == ["5000/5000", "updates", "q=1.29,", "val=1183s"]
    assert stream.failed is None and len(shown) <= 10


def test_a_failed_task_shows_its_last_lines() -> None:
    terminal = io.StringIO()
    stream = PipelineConsole(io.StringIO(), terminal)
    body = (
        "\n".join(f"    line {i}" for i in range(100))
        + "\n    ValueError: evaluation seeds [1000] are training seeds"
    )
    stream.write(_kfp("evaluate", "FAILURE", body))
    shown = terminal.getvalue().splitlines()
    assert stream.failed == "evaluate"
    assert shown[1].split()[:2] == ["evaluate", "FAILURE"]
    assert shown[-1].endswith("ValueError: evaluation seeds [1000] are training seeds")
    assert len(shown) == 3 + 40 and shown[3].endswith("| line 61")


def test_console_restores_the_streams_and_keeps_the_log_on_error(tmp_path: Path) -> None:
    stdout, stderr = sys.stdout, sys.stderr
    try:
        with console(tmp_path / "logs" / "run.log"):
            print("to the log only")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert sys.stdout is stdout and sys.stderr is stderr
    assert (tmp_path / "logs" / "run.log").read_text() == "to the log only\n"


def test_summary_names_uplift_gate_release_and_where_to_look() -> None:
    up = {"mean": 8.614, "low": 7.63, "high": 9.59}
    result = {
        "seconds": 412.3,
        "incumbent": "cem",
        "uplift_vs_incumbent_pct": up,
        "uplift_vs_cem_pct": up,
        "gate": {"passed": False, "reasons": ["uplift >= 10.0%"], "decision": "d"},
        "bento": None,
        "deploy": None,
        "report": "r",
        "plot": "p.png",
        "model": "m",
        "log": "l.log",
    }
    lines = summary_lines(result)
    assert lines[1] == "  uplift vs cem: +8.6% [+7.6, +9.6] watch time per session (95% CI)"
    later = summary_lines(result | {"incumbent": "incumbent"})[1]
    assert later.endswith("(vs CEM +8.6% [+7.6, +9.6]; 95% CIs)")
    assert lines[2].startswith("  gate:    REFUSE: uplift >= 10.0%")
    assert lines[-1] == "  log:     l.log" and len(lines) == 8
