"""ReBias's shared pieces (Tables 4b, 4c): the HSIC estimator, the median heuristic, the minimax
objective's gradients, and the networks f and g."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from projbench.hsic import hsic_unbiased, median_sigma, rbf_hsic, rbf_kernel
from projbench.models.rebias import BagNet18, ReBiasPair, SimpleConvNet, build_network
from projbench.tasks.rebias import rebias_objective


def hsic_by_definition(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al.'s HSIC_1 as the U-statistic it is: the mean over ordered 4-tuples of distinct
    indices of h = 1/24 sum over their orderings (s, t, u, v) of k_st l_st + k_st l_uv - 2 k_st l_su."""
    m = len(k)
    total, count = 0.0, 0
    for quad in itertools.permutations(range(m), 4):
        h = sum(k[s, t] * l[s, t] + k[s, t] * l[u, v] - 2 * k[s, t] * l[s, u]
                for s, t, u, v in itertools.permutations(quad))
        total += h / 24
        count += 1
    return total / count


def test_hsic_matches_its_definition_on_tiny_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    y = np.tanh(x[:, :2]) + 0.3 * rng.normal(size=(6, 2))
    k = rbf_kernel(torch.from_numpy(x), 1.3).numpy()
    l = rbf_kernel(torch.from_numpy(y), 0.7).numpy()
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert np.allclose(k, np.exp(-d2 / (2 * 1.3 ** 2)))
    expected = hsic_by_definition(k, l)
    assert hsic_unbiased(torch.from_numpy(k), torch.from_numpy(l)).item() == pytest.approx(expected, rel=1e-10)
    got = rbf_hsic(torch.from_numpy(x), torch.from_numpy(y), 1.3, 0.7).item()
    assert got == pytest.approx(expected, rel=1e-5)  # rbf_hsic computes in float32
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(torch.ones(3, 3), torch.ones(3, 3))


def test_hsic_is_near_zero_for_independent_inputs_and_grows_with_dependence():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    independent = rbf_hsic(x, torch.randn(256, 8, generator=gen), 3.0, 3.0).item()
    noisy = rbf_hsic(x, x + 2.0 * torch.randn(256, 8, generator=gen), 3.0, 3.0).item()
    dependent = rbf_hsic(x, x + 0.1 * torch.randn(256, 8, generator=gen), 3.0, 3.0).item()
    # Over seeds 0-4: |independent| <= 1.6e-4, noisy 0.85e-3 to 1.1e-3, dependent 0.015 to 0.016.
    assert abs(independent) < 5e-4 < noisy < 0.01 < dependent, (independent, noisy, dependent)
    assert rbf_hsic(x, x, 3.0, 3.0).item() == pytest.approx(dependent, rel=0.1)


def test_median_sigma_is_the_median_distance_with_the_diagonal():
    # squared distances of 0, 1, 3: 0 0 0 1 1 4 4 9 9 -> median 1
    assert median_sigma(torch.tensor([[0.0], [1.0], [3.0]])).item() == pytest.approx(1.0)
    x = torch.randn(9, 4)
    d2 = torch.cdist(x, x).pow(2).flatten().numpy()
    assert median_sigma(x).item() == pytest.approx(float(np.sqrt(np.median(d2))), rel=1e-5)


@pytest.mark.parametrize("sigma", [1.0, "median"])
def test_one_loss_gives_f_its_objective_and_g_the_opposite_hsic(sigma):
    """The gradient of rebias_objective is, for f's weights, that of CE(f) + lambda_f HSIC(f, g)
    and, for g's, that of CE(g) - lambda_g HSIC(g, f): one optimizer step takes both steps."""
    torch.manual_seed(0)
    pair = ReBiasPair(SimpleConvNet(4, 3, channels=(4, 6)), SimpleConvNet(4, 1, channels=(4, 6)))
    images, targets = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    f_params, g_params = list(pair.f.parameters()), list(pair.g.parameters())

    total = rebias_objective(*pair(images), targets, f_lambda=2.0, g_lambda=0.5, sigma=sigma)
    got_f = torch.autograd.grad(total, f_params, retain_graph=True)
    got_g = torch.autograd.grad(total, g_params)

    f_logits, f_feat, g_logits, g_feat = pair(images)
    s_f, s_g = (median_sigma(f_feat), median_sigma(g_feat)) if sigma == "median" else (sigma, sigma)
    f_objective = F.cross_entropy(f_logits, targets) + 2.0 * rbf_hsic(f_feat, g_feat, s_f, s_g)
    g_objective = F.cross_entropy(g_logits, targets) - 0.5 * rbf_hsic(g_feat, f_feat, s_f, s_g)
    for got, want in zip(got_f, torch.autograd.grad(f_objective, f_params, retain_graph=True)):
        assert torch.allclose(got, want, atol=1e-6)
    for got, want in zip(got_g, torch.autograd.grad(g_objective, g_params)):
        assert torch.allclose(got, want, atol=1e-6)
    assert any(w.abs().max() > 0 for w in got_g)


def test_g_with_1x1_kernels_sees_pixels_not_shape():
    """Shuffling the pixels of an image leaves the kernel-1 network's output unchanged (it sees
    colours only), while the kernel-7 network's changes."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 28, 28)
    shuffled = image.flatten(2)[..., torch.randperm(28 * 28)].reshape(1, 3, 28, 28)
    g, f = SimpleConvNet(10, 1).eval(), SimpleConvNet(10, 7).eval()
    assert torch.allclose(g(image)[0], g(shuffled)[0], atol=1e-5)
    assert not torch.allclose(f(image)[0], f(shuffled)[0], atol=1e-3)


def test_bagnet18_sees_5x5_patches_and_returns_pooled_512_features():
    net = BagNet18(num_classes=9).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    logits, features = net(x)
    assert logits.shape == (2, 9) and features.shape == (2, 512)
    assert torch.allclose(net.fc(features), logits)
    feature_map = net.stages(net.stem(x))
    feature_map[0, :, 3, 3].sum().backward()
    seen = x.grad[0].abs().sum(0).nonzero()
    assert (seen.max(0).values - seen.min(0).values + 1).tolist() == [5, 5]
    assert net.stem[2].momentum == 0.001


def test_timm_f_returns_its_logits_and_pooled_features():
    net = build_network("resnet18", 9, zero_init_last=False).eval()
    logits, features = net(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512) and torch.allclose(net.net.fc(features), logits)
    assert logits.shape == (2, 9)
