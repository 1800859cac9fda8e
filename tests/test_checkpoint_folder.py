"""A folder of epoch checkpoints: the newest intact one is chosen (a damaged newer one is
skipped with a warning), never none when all are damaged; old ones are pruned."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dynamight_core.checkpoint_file import CheckpointError, load_tagged, save_atomically
from dynamight_core.checkpoint_folder import (
    epoch_checkpoint_name,
    epoch_checkpoints,
    load_latest,
    prune,
)

FMT = "test checkpoints"


def _load(path: Path) -> dict:
    return load_tagged(path, FMT, {1})


def _save(folder: Path, epoch: int, name: str | None = None) -> Path:
    path = folder / (name or epoch_checkpoint_name(epoch))
    save_atomically({"format": FMT, "version": 1, "epoch": epoch, "w": torch.ones(100)}, path)
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def test_the_latest_intact_checkpoint_is_chosen(tmp_path, caplog):
    for epoch in (1, 2, 3):
        _save(tmp_path, epoch)
    final = _save(tmp_path, 2, "final.pth")
    assert load_latest(tmp_path, final, _load)[0].name == "003.pth"
    _truncate(tmp_path / "003.pth")
    with caplog.at_level(logging.WARNING):
        path, state = load_latest(tmp_path, final, _load)
    assert path == final and state["epoch"] == 2  # the final one wins a tie with 002
    assert "003.pth: is truncated" in caplog.text and "previous intact" in caplog.text
    _truncate(final)
    assert load_latest(tmp_path, final, _load)[0].name == "002.pth"


def test_no_checkpoint_is_none_and_all_damaged_is_an_error(tmp_path):
    assert load_latest(tmp_path / "missing", tmp_path / "final.pth", _load) is None
    _truncate(_save(tmp_path, 1))
    with pytest.raises(CheckpointError, match="001.pth: is truncated.*no intact earlier"):
        load_latest(tmp_path, tmp_path / "final.pth", _load)


def test_prune_keeps_the_newest_and_never_the_final(tmp_path):
    for epoch in range(1, 6):
        _save(tmp_path, epoch)
    _save(tmp_path, 5, "checkpoint_final.pth")
    assert prune(tmp_path, 0) == []
    deleted = prune(tmp_path, 2)
    assert [p.name for p in deleted] == ["001.pth", "002.pth", "003.pth"]
    assert [e for e, _ in epoch_checkpoints(tmp_path)] == [4, 5]
    assert (tmp_path / "checkpoint_final.pth").exists()
