"""``benchmarks/reference_side_by_side.py``: the epoch times it reads from both programs' logs,
the speed it compares, and the placeholders that let the reference's package import without its
GUI dependencies (the run itself needs the reference's source: a benchmark, not a test)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
side = importlib.import_module("reference_side_by_side")

REFERENCE_LOG = """\
Using a batch size of 128
Epoch: 1 Epoch time: 2.8323867321014404
new regularization parameter for half 1 is  0 False False
Epoch: 2 Epoch time: 1.75
Epoch: 3 Epoch time: 1.5
Epoch: 4 Epoch time: 7.45
Epoch: 5 Epoch time: 10.0
Epoch: 6 Epoch time: 12.0
Epoch: 7 Epoch time: 11.0
"""

OWN_LOG = """\
00:53:57 epoch 1/6 (joint): data 421.4 (mse 1.048e+06) reg 0.00444 KL 0.7932 lambda 35.3/76.5 \
held-out 2.125e+06, 50 particles/s, 35 s left
00:53:59 epoch 2/6 (warm-up): data 421.1 (mse 1.047e+06) reg 0.002584 KL 0.5057 lambda \
72.5/114 held-out 2.12371e+06, 200 particles/s, 19 s left
00:54:01 epoch 3/6 (joint): data 421 (mse 1e+06) reg 0.002 KL 0.5 lambda 72.5/114 held-out \
2.1e+06, 100 particles/s, 10 s left
"""


def test_reference_epochs_are_the_previous_epochs_time():
    epochs = side.reference_epochs(REFERENCE_LOG, n_warmup=3)
    # "Epoch: E Epoch time: T" is printed at the start of epoch E for epoch E - 1
    assert epochs[0] == (0, pytest.approx(2.8323867321014404), False)
    assert [e for e, _, j in epochs if j] == [3, 4, 5, 6]
    assert [s for e, s, _ in epochs if e == 3] == [7.45]


def test_own_epochs_from_the_logged_rate():
    epochs = side.own_epochs(OWN_LOG, n_train=900)
    assert epochs == [(1, 18.0, True), (2, 4.5, False), (3, 9.0, True)]


def test_joint_speed_is_the_median_joint_epoch_after_the_first_two():
    epochs = side.reference_epochs(REFERENCE_LOG, n_warmup=3)
    speed, used = side.joint_speed(epochs, 1000)
    assert used == 2  # joint epochs 3..6, the first two skipped: 12.0 and 11.0 s
    assert speed == pytest.approx(1000 / 11.5)
    assert side.joint_speed([(0, 2.0, False)], 1000) == (pytest.approx(float("nan"),
                                                                       nan_ok=True), 0)


def test_placeholder_packages_import_and_fail_when_used(monkeypatch):
    finder = side._PlaceholderFinder()
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    for name in ("voxelium", "voxelium.deep", "voxelium.deep.things"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from voxelium.deep.things import Anything  # a package the machines lack

    class Derived(Anything):  # usable as a base class, as the reference's GUI classes do
        pass

    assert isinstance(Derived(), Derived)
    with pytest.raises(RuntimeError, match="placeholder"):
        Anything()
    assert finder.find_spec("numpy") is None  # a real package is never replaced
