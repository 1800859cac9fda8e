"""`dynamight optimize-inverse-deformations` end to end: simulate -> optimize-deformations (3
epochs) -> inverse deformations with both methods, RELION-5's call form, resume, bad input."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamight_core.inverse_checkpoint import load_inverse_checkpoint, networks_from_checkpoint
from relion_external.cli import main


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory) -> Path:
    """A finished optimize-deformations output directory (small, 3 epochs)."""
    data = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--output-directory", str(data), "--n-particles", "240",
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "1.0",
                 "--n-gaussians", "300"]) == 0
    out = tmp_path_factory.mktemp("job")
    assert main(["optimize-deformations", "--refinement-star-file", str(data / "particles.star"),
                 "--initial-model", str(data / "consensus_map.mrc"),
                 "--output-directory", str(out), "--n-gaussians", "300", "--batch-size", "32",
                 "--n-threads", "1", "--n-epochs", "3", "--checkpoint-interval", "3",
                 "--n-map-fit-steps", "20"]) == 0
    return out


def _copy(forward_run: Path, tmp_path: Path) -> Path:
    job = tmp_path / "job"
    shutil.copytree(forward_run, job)
    return job


def _inverse(job: Path, *extra: str) -> int:
    return main(["optimize-inverse-deformations", str(job), "--batch-size", "32",
                 "--n-threads", "1", "--points-per-particle", "128", *extra])


def test_network_method_writes_both_halves(forward_run, tmp_path, capsys):
    job = _copy(forward_run, tmp_path)
    control = tmp_path / "relion_job"
    control.mkdir()
    assert _inverse(job, "--method", "network", "--n-epochs", "2", "--save-deformations",
                    "--pipeline-control", str(control)) == 0
    assert (control / "RELION_JOB_EXIT_SUCCESS").exists()
    state = torch.load(job / "inverse_deformations" / "inv_chkpt.pth", weights_only=True)
    assert state["method"] == "network" and state["epoch"] == 2
    assert state["config"]["forward_checkpoint"].endswith("checkpoint_final.pth")
    assert set(state["halves"]) == {"1", "2"}
    w1, w2 = (state["halves"][h]["network"]["position_layer.weight"] for h in ("1", "2"))
    assert not torch.equal(w1, w2)  # the halves never share a network
    networks = networks_from_checkpoint(
        load_inverse_checkpoint(job / "inverse_deformations" / "inv_chkpt.pth"))
    assert set(networks) == {1, 2} and networks[1] is not networks[2]
    for half in ("1", "2"):
        errors = state["held_out"][half]
        for method in ("network", "fixed-point"):
            assert 0 <= errors[method]["mean"] <= errors[method]["p95"] <= errors[method]["max"]
    printed = capsys.readouterr().out
    assert "inverse epoch 2/2" in printed and "particles/s" in printed
    assert "held-out inversion error, half 2, fixed-point" in printed
    assert len((job / "inverse_deformations" / "loss_log.txt").read_text().splitlines()) == 2

    meta = torch.load(job / "inverse_deformations" / "deformations_half1.pt", weights_only=True)
    d = np.load(job / "inverse_deformations" / "deformations_half1.npy", mmap_mode="r")
    n_half = 120  # every particle of half set 1, training and validation
    assert state["halves"]["1"]["train_indices"].shape == (n_half - 12,)
    assert d.dtype == np.float16 and d.shape == (n_half, meta["consensus"].shape[0], 3)
    assert meta["indices"].shape == (n_half,) and meta["latents"].shape == (n_half, 2)
    assert np.isfinite(d).all() and np.abs(d).max() > 0


def test_relion5_call_form_defaults_to_fixed_point(forward_run, tmp_path):
    job = _copy(forward_run, tmp_path)
    checkpoint = job / "forward_deformations" / "checkpoints" / "checkpoint_final.pth"
    assert main(["optimize-inverse-deformations", str(job), "--n-epochs", "3",
                 "--checkpoint-file", str(checkpoint), "--save-deformations",
                 "--preload-images"]) == 0
    state = torch.load(job / "inverse_deformations" / "inv_chkpt.pth", weights_only=True)
    assert state["method"] == "fixed-point" and state["epoch"] == 0
    assert set(state["halves"]) == {"1", "2"}
    assert set(state["held_out"]["1"]) == {"displacement", "fixed-point"}
    assert (job / "inverse_deformations" / "deformations_half2.npy").exists()
    # accurate relative to the deformations it inverts. The error depends on how rough the
    # field of this 3-epoch run on 240 particles is, which moves with the training's seed and
    # rounding: measured 2026-11-28 over seeds 0-3, both halves, mean error 23-41% of the mean
    # displacement and p95 23-36% of its p95 (the code of fd65682 gave 43% / 36% with seed 2,
    # so the earlier bound of 35% on the mean was inside that spread). Not inverting at all
    # gives 100%; a wrong sign gives about 200% (the inverse of a small field is close to its
    # negative)
    for half in ("1", "2"):
        held = state["held_out"][half]
        assert held["displacement"]["mean"] > 1.0  # Å: something to invert
        assert held["fixed-point"]["mean"] <= 0.5 * held["displacement"]["mean"]
        assert held["fixed-point"]["p95"] <= 0.5 * held["displacement"]["p95"]


def test_resume_matches_an_uninterrupted_run(forward_run, tmp_path, capsys):
    straight, resumed = _copy(forward_run, tmp_path / "a"), _copy(forward_run, tmp_path / "b")
    assert _inverse(straight, "--method", "network", "--n-epochs", "3") == 0
    assert _inverse(resumed, "--method", "network", "--n-epochs", "1") == 0
    assert _inverse(resumed, "--method", "network", "--n-epochs", "3") == 0
    assert "continuing the inverse networks" in capsys.readouterr().out
    logs = [(run / "inverse_deformations" / "loss_log.txt").read_text().splitlines()
            for run in (straight, resumed)]
    assert len(logs[1]) == 3
    for a, b in zip(*logs):
        va, vb = (np.array(line.split()[3::2], dtype=float) for line in (a, b))
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-8)
    # switching to fixed-point keeps (and measures) the trained networks
    assert _inverse(resumed, "--method", "fixed-point") == 0
    state = torch.load(resumed / "inverse_deformations" / "inv_chkpt.pth", weights_only=True)
    assert state["method"] == "fixed-point" and state["epoch"] == 3
    assert "network" in state["halves"]["2"] and "network" in state["held_out"]["2"]


def test_bad_directory_fails_with_a_clear_message(tmp_path, capsys):
    control = tmp_path / "relion_job"
    control.mkdir()
    missing = tmp_path / "no_such_job"
    assert main(["optimize-inverse-deformations", str(missing), "--n-epochs", "1",
                 "--pipeline-control", str(control)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "optimize-deformations" in err
    assert (control / "RELION_JOB_EXIT_FAILURE").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["optimize-inverse-deformations", str(empty)]) == 1
    assert "holds no checkpoint of optimize-deformations" in capsys.readouterr().err


def test_inverse_of_another_forward_checkpoint_is_set_aside(forward_run, tmp_path, capsys):
    job = _copy(forward_run, tmp_path)
    assert _inverse(job, "--method", "network", "--n-epochs", "1") == 0
    other = job / "forward_deformations" / "checkpoints" / "003.pth"
    assert _inverse(job, "--method", "network", "--n-epochs", "1",
                    "--checkpoint-file", str(other)) == 0
    assert "starting afresh" in capsys.readouterr().out
    folder = job / "inverse_deformations"
    assert (folder / "inv_chkpt_stale.pth").exists()
    state = torch.load(folder / "inv_chkpt.pth", weights_only=True)
    assert state["config"]["forward_checkpoint"] == "forward_deformations/checkpoints/003.pth"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_continue_skips_a_damaged_checkpoint_and_keeps_the_newest(forward_run, tmp_path,
                                                                   capsys):
    job = _copy(forward_run, tmp_path)
    folder = job / "inverse_deformations"
    assert _inverse(job, "--method", "network", "--n-epochs", "3", "--keep-checkpoints",
                    "2") == 0
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["002.pth", "003.pth"]
    _truncate(folder / "inv_chkpt.pth")
    _truncate(folder / "checkpoints" / "003.pth")
    capsys.readouterr()
    assert _inverse(job, "--method", "network", "--n-epochs", "4", "--keep-checkpoints",
                    "2") == 0
    log = capsys.readouterr().out
    assert "inv_chkpt.pth: is truncated" in log and "003.pth: is truncated" in log
    assert "using the previous intact checkpoint" in log and "002.pth (epoch 2)" in log
    assert "inverse epoch 3/4" in log
    assert torch.load(folder / "inv_chkpt.pth", weights_only=True)["epoch"] == 4
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["003.pth", "004.pth"]


def test_disk_full_is_a_one_line_error_and_leaves_no_partial_file(forward_run, tmp_path,
                                                                  capsys, monkeypatch):
    job = _copy(forward_run, tmp_path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    control = tmp_path / "relion_job"
    control.mkdir()
    assert _inverse(job, "--pipeline-control", str(control)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(job / "inverse_deformations" / "inv_chkpt.pth") in err and "no space left" in err
    assert (control / "RELION_JOB_EXIT_FAILURE").exists()
    assert list((job / "inverse_deformations").iterdir()) == []
