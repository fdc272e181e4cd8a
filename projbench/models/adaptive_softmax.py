"""Transformer-XL's adaptive softmax (Grave et al., 2017) in the form its WikiText-103 base model
uses: `ProjectedAdaptiveLogSoftmax` with div_val 1 and d_embed = d_model (kimiyoung/transformer-xl,
pytorch/utils/proj_adaptive_softmax.py; run_wt103_base.sh leaves div_val and d_embed at their
defaults, so tie_projs has no projection to tie).

The vocabulary, sorted by frequency, is cut at `cutoffs` into a head (the most frequent words) and
tail clusters. The head softmax is over the head's words plus one logit per tail cluster; a tail
word's log-probability is its cluster's head log-probability plus its log-probability within the
cluster. Every word's logit is `h . W[w] + b[w]` with one (n_token, d) weight matrix `W`: with
`weight=` the input embedding's own matrix (tied, the original's default; the base model's 151M
parameters), or a matrix of its own (untied, the original's `--not_tied`). There is no projection
in this form, unlike torch.nn.AdaptiveLogSoftmaxWithLoss, whose tail clusters always add a
(d, d / div_value) projection. No cutoffs: a plain softmax over the whole vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AdaptiveLogSoftmax(nn.Module):
    """`crit(hidden (N, d), target (N,))` -> per-token negative log-likelihood (N,), float32."""

    def __init__(self, n_token: int, d_model: int, cutoffs: Sequence[int] = (), weight: nn.Parameter | None = None):
        super().__init__()
        cutoffs = list(cutoffs)
        if cutoffs != sorted(set(cutoffs)) or (cutoffs and not 0 < cutoffs[0] <= cutoffs[-1] < n_token):
            raise ValueError(f"cutoffs must increase strictly within (0, {n_token}), got {cutoffs}")
        if weight is not None and tuple(weight.shape) != (n_token, d_model):
            raise ValueError(f"a tied weight must be ({n_token}, {d_model}), got {tuple(weight.shape)}")
        self.bounds = [0, *cutoffs, n_token]  # cluster k (0: the head) holds words bounds[k]:bounds[k+1]
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(n_token, d_model))
        self.bias = nn.Parameter(torch.zeros(n_token))
        # one head logit per tail cluster (the original appends them after the head's words too)
        self.cluster_weight = nn.Parameter(torch.zeros(len(cutoffs), d_model)) if cutoffs else None
        self.cluster_bias = nn.Parameter(torch.zeros(len(cutoffs))) if cutoffs else None

    @property
    def n_clusters(self) -> int:
        return len(self.bounds) - 2

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        head_end = self.bounds[1]
        head_weight, head_bias = self.weight[:head_end], self.bias[:head_end]
        if self.n_clusters:
            head_weight = torch.cat([head_weight, self.cluster_weight])
            head_bias = torch.cat([head_bias, self.cluster_bias])
        head_logp = F.log_softmax(F.linear(hidden, head_weight, head_bias).float(), dim=-1)
        # head words directly; the entries of tail words are replaced below
        nll = -head_logp.gather(1, target.clamp(max=head_end - 1)[:, None]).squeeze(1)
        for k in range(1, self.n_clusters + 1):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            rows = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            if rows.numel() == 0:  # a host sync per cluster, as in the original and in torch's
                continue
            tail_logits = F.linear(hidden[rows], self.weight[lo:hi], self.bias[lo:hi]).float()
            tail_logp = F.log_softmax(tail_logits, dim=-1).gather(1, (target[rows] - lo)[:, None]).squeeze(1)
            nll = nll.index_copy(0, rows, -(head_logp[rows, head_end + k - 1] + tail_logp))
        return nll
