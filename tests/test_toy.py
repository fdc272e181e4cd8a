"""The project page's toys, through the real loop: momentum grows ||w|| as the page reports, and
SGDP in the form of the paper's Algorithm 1 keeps the norm where the page's SGDP does."""

from __future__ import annotations

import pytest

from conftest import make_cfg
from projbench.train import train

TOY = ["task=toy", "logger=none", "trainer.progress=false"]


def _run(tmp_path, name, overrides):
    """One run in-process; its config snapshot where Hydra would write it, so tables find it."""
    from omegaconf import OmegaConf

    cfg = make_cfg(TOY + overrides)
    (tmp_path / name / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
    return train(cfg, tmp_path / name)


def test_momentum_norm_growth_matches_the_paper_and_sgdp_keeps_the_norm(tmp_path):
    m09 = _run(tmp_path, "m09", ["optim=sgd", "optim.momentum=0.9"])
    m099 = _run(tmp_path, "m099", ["optim=sgd", "optim.momentum=0.99"])
    sgdp = _run(tmp_path, "sgdp", ["optim=sgdp", "optim.momentum=0.9"])
    alg1 = _run(tmp_path, "alg1", ["optim=sgdp_alg1", "optim.momentum=0.9"])
    plain = _run(tmp_path, "plain", ["optim=sgd", "optim.momentum=0"])
    # Project page: the norm grows from 1 to 2.93 (momentum 0.9) and 27.87 (momentum 0.99); its
    # SGDP ends at 1.12, which Algorithm 1 reaches and the official form (1.17) does not.
    assert m09["derived"]["final_norm"] == pytest.approx(2.93, abs=0.005)
    assert m099["derived"]["final_norm"] == pytest.approx(27.87, abs=0.005)
    assert plain["derived"]["final_norm"] < 1.05
    assert alg1["derived"]["final_norm"] == pytest.approx(1.12, rel=0.03)
    assert sgdp["derived"]["final_norm"] == pytest.approx(1.17, abs=0.01)
    # SGDP converges first (1 - cos < 1e-3), momentum SGD before plain SGD.
    steps = {k: r["derived"]["steps_to_converge"] for k, r in
             {"sgdp": sgdp, "m09": m09, "plain": plain}.items()}
    assert steps["sgdp"] < steps["m09"] < steps["plain"]
    assert (tmp_path / "sgdp" / "toy.png").stat().st_size > 10_000
    assert sgdp["metrics"]["test/cos"]["final"] > 0.999
    # the one weight is scale-invariant: all of the model
    assert sgdp["scale_invariant"] == {"tensors": 1, "tensors_share": 1.0, "params": 2, "params_share": 1.0,
                                       "detected_at_step": 1}


def test_rosenbrock_hemisphere_is_scale_invariant():
    import torch

    from projbench.tasks.toy import Chart, rosenbrock3d_loss

    chart = Chart(scale=1.0, center=(0.5, 1.0))
    w = torch.tensor([chart.direction(-2.0, 2.0)], dtype=torch.float64)
    assert rosenbrock3d_loss(w, 300.0, chart) == pytest.approx(rosenbrock3d_loss(7.5 * w, 300.0, chart))
    assert rosenbrock3d_loss(w, 300.0, chart) == pytest.approx(9 + 300 * 4)  # f(-2, 2)
    assert rosenbrock3d_loss(torch.tensor([chart.direction(1.0, 1.0)], dtype=torch.float64), 300.0, chart) < 1e-20


def test_3d_toy_reproduces_the_page_radii(tmp_path):
    """The page's 3-D figure: after 200 iterations r = 3.16 for GD + momentum, 1.12 with the
    projection (Algorithm 1 here; the official form ends at 1.19), 0.84 with weight decay."""
    gd = _run(tmp_path, "gd", ["task=toy3d", "optim=sgd", "optim.momentum=0.9"])
    wd = _run(tmp_path, "wd", ["task=toy3d_wd", "optim=sgd", "optim.momentum=0.9"])
    alg1 = _run(tmp_path, "alg1", ["task=toy3d", "optim=sgdp_alg1", "optim.momentum=0.9"])
    assert gd["steps"] == 200
    assert gd["derived"]["final_norm"] == pytest.approx(3.16, rel=0.03)
    assert wd["derived"]["final_norm"] == pytest.approx(0.84, rel=0.03)
    assert alg1["derived"]["final_norm"] == pytest.approx(1.12, rel=0.03)
    assert {"test/psi", "test/phi"} <= set(gd["metrics"])
    # the tables draw the page's figure from these runs: one panel per row that has a run
    from projbench.tables import main

    assert main(["--runs", str(tmp_path), "--table", "toy3d", "--out", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "figures" / "toy3d.png").stat().st_size > 50_000
