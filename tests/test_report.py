"""What users see: the per-round table and the final summary go to the current stdout."""

from __future__ import annotations

import contextlib
import io

from flwr.app import ArrayRecord


def test_round_table_and_summary_print_to_the_stdout_of_the_moment():
    """`RoundRecorder` and `print_summary` default to `out=sys.stdout`, which Python evaluates
    once, when flwr_kd.report is imported: output redirected afterwards (contextlib, pytest's
    capsys, a notebook) goes to the stream of import time instead. Whether the CLI test sees the
    summary then depends on which test imported flwr_kd.report first."""
    from flwr_kd.report import RoundRecorder, print_summary  # imported before the redirect

    result = {
        "rounds": [{"accuracy": {"resnet10t": 0.5}}],
        "baselines": {"local_only": {"resnet10t": 0.25}},
    }
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        recorder = RoundRecorder(["resnet10t"], lambda server_round, arrays: {"resnet10t": 0.5})
        recorder.header("fedmd on digits")
        recorder(0, ArrayRecord())
        print_summary(result)
    printed = buf.getvalue()
    assert "fedmd on digits" in printed
    assert "final test accuracy  local_only" in printed
    assert "0.500  0.250" in printed
