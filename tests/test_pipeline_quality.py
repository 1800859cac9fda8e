"""The collapse guard: the whole pipeline (``dynamight demo``) with the default training settings
on low-SNR, protein-like data learns the motion and improves the map where it moves.

With the image encoder this replaced, the latent space collapsed at realistic SNR (KL to ~0,
kNN R² of the true motion ~0) and early stopping ended training before anything was learnt, so
the deformed maps were the consensus (issue 10). This test fails if that returns: the latent
codes of *held-out* particles must follow the true motion, the deformed half maps must beat the
rigid ones shell by shell in the moving region, and the static region must not get worse.

Data: the ``clamp`` preset (two lobes moving 8-15 Å, about 320 residues at atomic density) at
box 32, 3 Å/px, SNR 0.1 (over the box; per particle about as much signal as SNR 0.025 at box
64), astigmatic CTFs, shifts; 3,000 particles. Training: the command's defaults except the
number of Gaussians (1,500) and a budget of 30 epochs, for time (3 min on 2 CPU cores).
Measured with these seeds (2026-11-27, before the motion-mode start became the default): kNN R²
0.865 / 0.864 (validation 0.862 / 0.859), 88% of the moving region's gap closed, static region
+0.007, every costly shell closing 65-90% of its own gap. The thresholds leave room for that and are far above what the encoder version
reached on the same data (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np

from relion_external.cli import main
from relion_external.truth_comparison import compare_with_truth

SHELLS = slice(1, 15)  # 96 Å .. 6.9 Å of a 6 Å Nyquist


def test_defaults_learn_the_motion_at_low_snr_and_improve_the_moving_region(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output-directory", str(out), "--n-particles", "3000",
                 "--box-size", "32", "--pixel-size", "3.0", "--snr", "0.1",
                 "--n-gaussians", "1500", "--n-epochs", "30", "--n-threads", "2"]) == 0
    assert (out / "comparison.png").stat().st_size > 10_000
    result = compare_with_truth(out / "data", {"rigid": out / "reconstruct",
                                               "deformed": out / "dynamight" / "backprojection",
                                               "upper": out / "reconstruct_nomotion"},
                                out / "dynamight" / "particles.star")
    s = result.scores
    print({k: v for k, v in s.items() if not k.startswith("half_map")})
    # codes of held-out particles (never trained on) predict the true motion
    assert s["r2_half1_validation"] >= 0.65 and s["r2_half2_validation"] >= 0.65
    assert s["r2_half1"] >= 0.65 and s["r2_half2"] >= 0.65
    # the moving region gets closer to the truth: no shell worse, and every shell where the
    # motion costs the rigid map something closes a good part of its own gap
    rigid = result.curves["rigid_vs_truth_moving"][SHELLS]
    deformed = result.curves["deformed_vs_truth_moving"][SHELLS]
    upper = result.curves["upper_vs_truth_moving"][SHELLS]
    print("rigid   ", np.round(rigid, 3))
    print("deformed", np.round(deformed, 3))
    print("upper   ", np.round(upper, 3))
    assert (deformed >= rigid - 0.005).all()
    costly = upper - rigid >= 0.02
    assert costly.sum() >= 6
    assert (deformed - rigid >= 0.4 * (upper - rigid))[costly].all()
    assert s["moving_gap_closed"] >= 0.5
    # and the static region does not get worse
    static_rigid = result.curves["rigid_vs_truth_static"][1:]
    static_deformed = result.curves["deformed_vs_truth_static"][1:]
    assert (static_deformed >= static_rigid - 0.02).all()
    # no shared bias of the two halves: the half maps claim no more than the truth supports
    assert s["claim_excess_deformed"] <= s["claim_excess_upper"] + 0.05
