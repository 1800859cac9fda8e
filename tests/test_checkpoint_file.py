"""Checkpoint files: damaged, foreign, pickled or other-version files are refused with a reason
naming the file; a write that fails (disk full) leaves nothing under the final name."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch

from dynamight_core import checkpoint_file
from dynamight_core.checkpoint_file import (
    CheckpointError,
    CheckpointWriteError,
    load_tagged,
    save_atomically,
)

FMT = "test checkpoints"


def _good(path: Path, version: int = 1) -> Path:
    save_atomically({"format": FMT, "version": version, "x": torch.arange(1000.0)}, path)
    return path


def _refused(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_tagged(path, FMT, {1})
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value.problem


def test_an_intact_checkpoint_round_trips(tmp_path):
    state = load_tagged(_good(tmp_path / "a.pth"), FMT, {1})
    assert torch.equal(state["x"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no temporary file left


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_checkpoint_is_named_as_truncated(tmp_path, keep):
    path = _good(tmp_path / "a.pth")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    assert "truncated" in _refused(path)


def test_an_empty_file_and_a_text_file_are_not_checkpoints(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in _refused(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello\n")
    assert "not a checkpoint" in _refused(tmp_path / "text.pth")
    assert "cannot be read" in _refused(tmp_path / "missing.pth")


def test_pickled_objects_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"format": FMT, "version": 1, "decoder": torch.nn.Linear(2, 2)}, path)  # a module
    problem = _refused(path)
    assert "pickled Python objects" in problem and "Linear" in problem
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"format": FMT}))
    assert "not a checkpoint" in _refused(raw)


def test_another_format_or_version_is_refused(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"format": "something else", "version": 1}, other)
    assert "not a test checkpoints checkpoint (a 'something else' file)" in _refused(other)
    torch.save([1, 2], other)
    assert "no format tag" in _refused(other)
    assert "format version 7; this program reads version 1" in _refused(
        _good(tmp_path / "newer.pth", version=7))


def test_disk_full_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = _good(tmp_path / "a.pth")
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_file.torch, "save", full)
    with pytest.raises(CheckpointWriteError) as info:
        save_atomically({"format": FMT, "version": 1}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]
    with pytest.raises(CheckpointWriteError):
        save_atomically({"format": FMT, "version": 1}, tmp_path / "new.pth")
    assert not (tmp_path / "new.pth").exists()


def test_an_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointWriteError) as info:
        save_atomically({"format": FMT, "version": 1}, blocker / "sub" / "a.pth")
    assert str(blocker / "sub" / "a.pth") in str(info.value)
