"""Longer quality runs (``bash scripts/test.sh -m slow``, about 5 minutes on 2 CPU cores): the
collapse guard of ``test_pipeline_quality.py`` at half its SNR and on the other preset (a
twisting bundle plus a non-linear hinge), each with the default training settings except 1,500
Gaussians and 30 epochs, box 32 at 3 Å/px, 3,000 particles.

Measured 2026-11-27 (fixed seeds): ``clamp`` at SNR 0.05: kNN R² 0.67 / 0.65 (validation
0.64 / 0.62), 75% of the moving region's gap closed, static +0.010. ``twist-hinge`` at SNR 0.1:
with a zero-started decoder R² 0.20 / 0.20 (validation 0.11 / 0.24), 23% of the gap, so it was
an expected failure; with the motion-mode start (the default since commit 81fbc42) it passes:
78% of the gap, static +0.0096, validation R² above the 0.5 asserted (2026-11-27, commit
d0dc8fb; the R² values of that run were not recorded)."""

from __future__ import annotations

import pytest

from relion_external.cli import main
from relion_external.truth_comparison import compare_with_truth


def _demo(out, preset: str, snr: float):
    assert main(["demo", "--output-directory", str(out), "--preset", preset,
                 "--n-particles", "3000", "--box-size", "32", "--pixel-size", "3.0",
                 "--snr", str(snr), "--n-gaussians", "1500", "--n-epochs", "30",
                 "--n-threads", "2"]) == 0
    result = compare_with_truth(out / "data", {"rigid": out / "reconstruct",
                                               "deformed": out / "dynamight" / "backprojection",
                                               "upper": out / "reconstruct_nomotion"},
                                out / "dynamight" / "particles.star")
    print(result.scores)
    return result.scores


@pytest.mark.slow
@pytest.mark.parametrize("preset, snr, min_r2, min_gap", [
    ("clamp", 0.05, 0.5, 0.5),
    ("twist-hinge", 0.1, 0.5, 0.4),
])
def test_defaults_learn_other_motions_and_lower_snr(tmp_path, preset, snr, min_r2, min_gap):
    s = _demo(tmp_path / "demo", preset, snr)
    assert s["r2_half1_validation"] >= min_r2 and s["r2_half2_validation"] >= min_r2
    assert s["moving_gap_closed"] >= min_gap
    assert s["static_area_change"] >= -0.01
