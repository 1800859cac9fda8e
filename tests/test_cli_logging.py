"""Progress lines go to the current sys.stdout (RELION's run.out), even after it was swapped."""

from __future__ import annotations

import io
import logging
import sys

from relion_external.cli import configure_logging


def test_log_lines_follow_sys_stdout(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    configure_logging()
    first.close()  # e.g. a test harness's capture that has ended
    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    logging.getLogger("dynamight.test").info("epoch 1/2")
    assert "epoch 1/2" in second.getvalue()
