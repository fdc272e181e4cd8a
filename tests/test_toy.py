"""The paper's 2-D toy, through the real loop: momentum grows ||w|| as the project page reports."""

from __future__ import annotations

import pytest

from conftest import make_cfg
from projbench.train import train

TOY = ["task=toy", "logger=none"]


def _run(tmp_path, name, overrides):
    return train(make_cfg(TOY + overrides), tmp_path / name)


def test_momentum_norm_growth_matches_the_paper_and_sgdp_keeps_the_norm(tmp_path):
    m09 = _run(tmp_path, "m09", ["optim=sgd", "optim.momentum=0.9"])
    m099 = _run(tmp_path, "m099", ["optim=sgd", "optim.momentum=0.99"])
    sgdp = _run(tmp_path, "sgdp", ["optim=sgdp", "optim.momentum=0.9"])
    plain = _run(tmp_path, "plain", ["optim=sgd", "optim.momentum=0"])
    # Project page: the norm grows from 1 to 2.93 (momentum 0.9) and 27.87 (momentum 0.99).
    assert m09["derived"]["final_norm"] == pytest.approx(2.93, abs=0.005)
    assert m099["derived"]["final_norm"] == pytest.approx(27.87, abs=0.005)
    assert plain["derived"]["final_norm"] < 1.05
    assert sgdp["derived"]["final_norm"] < 1.2
    # SGDP converges first (1 - cos < 1e-3), momentum SGD before plain SGD.
    steps = {k: r["derived"]["steps_to_converge"] for k, r in
             {"sgdp": sgdp, "m09": m09, "plain": plain}.items()}
    assert steps["sgdp"] < steps["m09"] < steps["plain"]
    assert (tmp_path / "sgdp" / "toy.png").stat().st_size > 10_000
    assert sgdp["metrics"]["test/cos"]["final"] > 0.999


def test_rosenbrock_hemisphere_is_scale_invariant(tmp_path):
    import torch

    from projbench.tasks.toy import rosenbrock3d_loss

    w = torch.tensor([[-2.0, 2.0, 1.0]], dtype=torch.float64)
    assert rosenbrock3d_loss(w, 300.0) == pytest.approx(rosenbrock3d_loss(7.5 * w, 300.0))
    assert rosenbrock3d_loss(torch.ones(1, 3, dtype=torch.float64), 300.0) == 0
    out = _run(tmp_path, "r3", ["task=toy3d", "optim=sgdp", "trainer.max_steps=20"])
    assert out["status"] == "completed" and out["steps"] == 20
