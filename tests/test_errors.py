"""The adapter's errors: outputs that cannot be written and core checkpoint errors become one
line naming the path and what to do."""

from __future__ import annotations

import errno
import os

import pytest

from dynamight_core.checkpoint_file import CheckpointError, CheckpointWriteError
from relion_external.errors import InputError, OutputError, adapter_error


@pytest.mark.parametrize(("number", "says"), [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EACCES, "the folder is not writable"),
    (errno.EROFS, "the folder is not writable"),
    (errno.EIO, "cannot be written (Input/output error)"),
])
def test_output_errors_name_the_path_and_the_cause(number, says):
    err = OutputError.from_os_error("/job/map.mrc", OSError(number, os.strerror(number)))
    text = str(err)
    assert text.startswith("/job/map.mrc: write: ") and says in text
    assert "\n" not in text and err.label == "output error"


def test_core_checkpoint_errors_become_adapter_errors():
    read = adapter_error(CheckpointError("/job/001.pth", "is truncated or damaged"))
    assert isinstance(read, InputError) and read.label == "input error"
    assert str(read).startswith("/job/001.pth: checkpoint: is truncated or damaged. ")
    write = adapter_error(CheckpointWriteError("/job/002.pth", "cannot be written: full",
                                               errno.ENOSPC))
    assert isinstance(write, OutputError) and "no space left" in str(write)
    same = InputError(None, "--x", "bad", "Fix it.")
    assert adapter_error(same) is same and adapter_error(ValueError("other")) is None
