"""The Hilbert-Schmidt Independence Criterion with Gaussian (RBF) kernels, as ReBias uses it.

HSIC(X, Y) is zero when X and Y are independent and grows with their dependence. ReBias
(Bahng et al., ICML 2020) trains a network f to be independent of a network g that is biased by
design, so this is the quantity its minimax pushes down for f and up for g.

The estimator is the unbiased one of Song et al. (2012), "Feature selection via dependence
maximization", which ReBias uses in its paper (clovaai/rebias criterions/hsic.py, `hsic_alg`
'unbiased' in main_biased_mnist.py and main_imagenet.py): with K~ and L~ the two kernel matrices
with their diagonals set to zero and m >= 4 samples,

    HSIC_1 = [tr(K~ L~) + (1' K~ 1)(1' L~ 1) / ((m-1)(m-2)) - 2 / (m-2) 1' K~ L~ 1] / (m (m-3)).

(The upstream code subtracts each column's diagonal entry instead of zeroing the diagonal; for an
RBF kernel the diagonal is 1, and the estimator does not change when a constant is added to every
off-diagonal entry, so the two agree.) The kernel is k(x, x') = exp(-||x - x'||^2 / (2 sigma^2)) on
the flattened features; `median_sigma` is the median heuristic for sigma.
"""

from __future__ import annotations

import torch


def rbf_kernel(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The (m, m) Gaussian kernel matrix of the m rows of `x` (flattened to vectors)."""
    x = x.reshape(len(x), -1)
    return torch.exp(-squared_distances(x) / (2 * sigma ** 2))


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 for every pair of rows, by the Gram matrix, clamped at 0 (rounding)."""
    x = x.reshape(len(x), -1)
    gram = x @ x.T
    norms = gram.diagonal()
    return (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0)


def median(values: torch.Tensor) -> torch.Tensor:
    """numpy's median of a 1-D tensor (the mean of the two middle values of an even count), by
    sorting: torch.quantile refuses more than 2^24 values, an epoch's distances may be more."""
    values = values.sort().values
    n = len(values)
    return (values[(n - 1) // 2] + values[n // 2]) / 2


def median_sigma(x: torch.Tensor) -> torch.Tensor:
    """The median heuristic: sqrt of the median of the m^2 squared pairwise distances of the rows
    of `x`, the m zeros of the diagonal included, as clovaai/rebias criterions/sigma_utils.py
    (`median_distance`) computes it. Detached: the bandwidth is not trained."""
    return median(squared_distances(x.detach().float()).flatten()).sqrt()


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC estimate from two (m, m) kernel matrices, m >= 4."""
    m = k.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {m}")
    off_diagonal = 1 - torch.eye(m, dtype=k.dtype, device=k.device)
    k, l = k * off_diagonal, l * off_diagonal
    k_cols, l_cols = k.sum(0), l.sum(0)
    value = (k * l).sum() + k_cols.sum() * l_cols.sum() / ((m - 1) * (m - 2)) - 2 * (k_cols @ l_cols) / (m - 2)
    return value / (m * (m - 3))


def rbf_hsic(x: torch.Tensor, y: torch.Tensor, sigma_x: float | torch.Tensor,
             sigma_y: float | torch.Tensor) -> torch.Tensor:
    """HSIC_1 of the rows of `x` and `y` with RBF kernels of bandwidths sigma_x and sigma_y,
    computed in float32 even under autocast (the kernel's exponent is sensitive to rounding)."""
    with torch.autocast(x.device.type, enabled=False):
        return hsic_unbiased(rbf_kernel(x.float(), sigma_x), rbf_kernel(y.float(), sigma_y))
