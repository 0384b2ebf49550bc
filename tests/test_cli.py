"""The command line's own checks: flags refused before any model loads."""

from __future__ import annotations

import pytest

from armquant import runtime
from armquant.cli import build_parser


@pytest.mark.parametrize("command", [
    ["eval", "m", "--max-windows", "0"],
    ["compare", "m", "--max-windows", "-1"],
    ["compare", "m", "--calib-windows", "0"],
    ["calibrate", "m", "--max-windows", "0"],
    ["calibrate", "m", "--threads", "0"],
    ["quantize", "m", "out", "--scheme", "w8a16-gptq", "--calib-windows", "0"],
    ["generate", "m", "hi", "--threads", "0"],
    ["serve", "m", "--threads", "-2"],
])
def test_counts_below_one_are_refused_by_flag(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(command)
    flag = command[-2]
    assert f"argument {flag}: {command[-1]} is not a count: give at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("threads", [0, -1, 2.0, True])
def test_session_options_refuse_a_thread_count_below_one(threads):
    with pytest.raises(ValueError, match=f"threads={threads!r} must be an integer >= 1"):
        runtime.session_options(library="none", threads=threads)
