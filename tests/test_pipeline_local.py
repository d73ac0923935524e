"""`python -m pipelines.local --iterations N`: the table and plot of the continuous loop (the runs themselves are
tests/test_pipeline_e2e.py's)."""

from pathlib import Path

import pytest

from pipelines.local import iterations_markdown, plot_iterations


def _row(i: int, passed: bool) -> dict:
    return {
        "iteration": i,
        "log_seed": 1000 + i,
        "seconds": 600.0,
        "incumbent": "CEM (first release)" if i == 1 else f"v{i - 1}",
        "uplift_vs_incumbent_pct": {"mean": 2.0 * i, "low": 1.0, "high": 3.0 * i},
        "uplift_vs_cem_pct": {"mean": 5.0, "low": 4.0, "high": 6.0},
        "gate_passed": passed,
        "model_version": f"v{i}" if passed else None,
        "bento": None,
        "commit": "0123456789abcdef" if passed else None,
        "run": "r",
    }


def test_iterations_table_and_plot(tmp_path: Path) -> None:
    rows = [_row(1, True), _row(2, False)]
    table = iterations_markdown(rows).splitlines()
    assert len(table) == 4
    assert table[2].split("|")[1:-1] == [
        " 1 ",
        " 1001 ",
        " CEM (first release) ",
        " +2.0% [+1.0, +3.0] ",
        " +5.0% [+4.0, +6.0] ",
        " pass ",
        " v1 ",
        " 0123456789ab ",
        " 10.0 ",
    ]
    assert " refuse " in table[3] and " - " in table[3]
    plot_iterations(rows, tmp_path / "iterations.png")
    assert (tmp_path / "iterations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_iterations_refuse_a_fixed_log_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each iteration of the loop logs on its own training seed (the table records which): a --param log_seed
    would silently override all of them."""
    from pipelines.local import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--iterations", "2", "--param", "log_seed=1000", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "log_seed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran
