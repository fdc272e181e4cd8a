"""Transformer-XL (Dai et al., 2019) as in its official PyTorch code (kimiyoung/transformer-xl,
pytorch/mem_transformer.py, attn_type 0).

What makes it Transformer-XL:
  * segment-level recurrence: each layer also attends over `mem_len` cached hidden states of the
    previous segments (the layer inputs, detached: no gradient flows into the past);
  * relative positional attention: score(i, j) = (q_i + u) k_j + (q_i + v) W_r R_{i-j}, with
    sinusoidal R, and u = r_w_bias, v = r_r_bias learned per head and shared by all layers.
Post-LN by default (LayerNorm(x + sublayer(x)), as the original base model), pre-LN with
`pre_lnorm=True`. Output: the original's adaptive softmax, tied to the input embedding by default
(projbench/models/adaptive_softmax.py); no cutoffs: a plain softmax.

How far a segment sees is a `Context`: the memory it keeps (`mem_len`), the clamp of relative
distances (`clamp_len`: distances beyond it share one position embedding) and same-length
attention (`same_length`: once the memory is full every token attends to exactly `mem_len`
positions, itself included, instead of the first tokens of a segment seeing fewer than the last).
The model holds its training context; an evaluation passes its own (the original's eval.py:
mem_len 640, clamp_len 400, same_length, with segments of 64 tokens).

Weight normalisation (`weight_norm=`, the names of the linear layers it applies to): the weight
of each named linear layer of every attention and feed-forward block becomes `g * v / ||v||`, per
output row (torch.nn.utils.parametrizations.weight_norm, dim 0; Salimans & Kingma, 2016). The
direction `v` (parameter `parametrizations.weight.original1`) is then scale-invariant row by row,
the case AdamP's channel-view projection is made for; the gain `g` (`original0`, shape (out, 1)) is not.

Shapes are batch-first here: (batch, time, d_model). Not included: ext_len, sampled softmax,
div_val > 1 (the large model's adaptive input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as apply_weight_norm

from projbench.models.adaptive_softmax import AdaptiveLogSoftmax

Mems = list[Tensor]  # one (batch, mlen, d_model) tensor per layer

#: the linear layers weight normalisation can apply to: attention (queries/keys/values, relative
#: positions, output) and the position-wise feed-forward block (in, out)
WEIGHT_NORM_LAYERS = ("qkv_net", "r_net", "o_net", "ff_in", "ff_out")


@dataclass(frozen=True)
class Context:
    """What a segment sees beyond itself; see the module docstring."""

    mem_len: int
    clamp_len: int = -1
    same_length: bool = False

    def __post_init__(self):
        if self.same_length and self.mem_len <= 0:
            raise ValueError("same_length needs a memory (mem_len > 0): each token sees mem_len positions")


def rel_shift(x: Tensor) -> Tensor:
    """(B, H, Q, K) scores against distances K-1 .. 0 (column c: distance K-1-c) -> scores where
    [i, j] is against query i's distance to key j, (K - Q + i) - j. Entries with j past the query
    are garbage; the causal mask removes them."""
    b, h, q, k = x.shape
    x = F.pad(x, (1, 0)).view(b, h, k + 1, q)
    return x[:, :, 1:].reshape(b, h, q, k)


class RelMultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float, pre_lnorm: bool):
        super().__init__()
        self.n_head, self.d_head, self.pre_lnorm = n_head, d_head, pre_lnorm
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model)
        self.drop, self.dropatt = nn.Dropout(dropout), nn.Dropout(dropatt)
        self.scale = d_head ** -0.5

    def forward(self, h: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, mask: Tensor,
                mem: Tensor | None) -> Tensor:
        b, qlen, _ = h.shape
        cat = h if mem is None else torch.cat([mem, h], 1)
        klen = cat.size(1)
        x = self.layer_norm(cat) if self.pre_lnorm else cat
        q, k, v = self.qkv_net(x).view(b, klen, 3, self.n_head, self.d_head).unbind(2)
        q = q[:, -qlen:]
        r_k = self.r_net(r).view(klen, self.n_head, self.d_head)
        content = torch.einsum("bihd,bjhd->bhij", q + r_w_bias, k)  # terms (a) + (c) of the paper
        position = rel_shift(torch.einsum("bihd,jhd->bhij", q + r_r_bias, r_k))  # terms (b) + (d)
        score = ((content + position) * self.scale).masked_fill(mask, float("-inf"))
        prob = self.dropatt(score.softmax(-1))
        out = torch.einsum("bhij,bjhd->bihd", prob, v).reshape(b, qlen, self.n_head * self.d_head)
        out = self.drop(self.o_net(out))
        return h + out if self.pre_lnorm else self.layer_norm(h + out)


class PositionwiseFF(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool):
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.ff_in, self.ff_out = nn.Linear(d_model, d_inner), nn.Linear(d_inner, d_model)
        self.drop = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def core(self, h: Tensor) -> Tensor:
        return self.drop(self.ff_out(self.drop(F.relu(self.ff_in(h)))))

    def forward(self, h: Tensor) -> Tensor:
        if self.pre_lnorm:
            return h + self.core(self.layer_norm(h))
        return self.layer_norm(h + self.core(h))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_head: int, d_inner: int, dropout: float, dropatt: float,
                 pre_lnorm: bool):
        super().__init__()
        self.attn = RelMultiHeadAttention(d_model, n_head, d_head, dropout, dropatt, pre_lnorm)
        self.ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm)

    def forward(self, h, r, r_w_bias, r_r_bias, mask, mem):
        return self.ff(self.attn(h, r, r_w_bias, r_r_bias, mask, mem))


class TransformerXL(nn.Module):
    """`model(inputs, targets, mems)` -> (per-token NLL (B, L), new mems): the language model.
    `model.transformer(inputs, mems)` -> (last hidden states (B, L, d_model), new mems).
    Both take an optional `context=` (default: the training context the model was built with)."""

    def __init__(self, n_token: int, n_layer: int = 16, d_model: int = 410, n_head: int = 10, d_head: int = 41,
                 d_inner: int = 2100, dropout: float = 0.1, dropatt: float = 0.0, mem_len: int = 150,
                 clamp_len: int = -1, same_length: bool = False, pre_lnorm: bool = False,
                 adaptive_cutoffs: Sequence[int] | None = (20000, 40000, 200000), tie_weight: bool = True,
                 weight_norm: Sequence[str] = (), init_std: float = 0.02):
        super().__init__()
        unknown = sorted(set(weight_norm) - set(WEIGHT_NORM_LAYERS))
        if unknown:
            raise ValueError(f"weight_norm: unknown layers {unknown}; choose from {list(WEIGHT_NORM_LAYERS)}")
        self.d_model = d_model
        self.context = Context(mem_len, clamp_len, same_length)
        self.word_emb = nn.Embedding(n_token, d_model)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_head, d_head, d_inner, dropout, dropatt, pre_lnorm)
                                    for _ in range(n_layer))
        self.drop = nn.Dropout(dropout)
        self.crit = AdaptiveLogSoftmax(n_token, d_model, adaptive_cutoffs or (),
                                       weight=self.word_emb.weight if tie_weight else None)
        self._init_weights(init_std)
        # after the init: g starts at ||v||, so the function is unchanged
        for module in [m for name, m in self.layers.named_modules() if name.rsplit(".", 1)[-1] in weight_norm]:
            apply_weight_norm(module, dim=0)

    def _init_weights(self, std: float) -> None:
        """As the original's weights_init with init='normal': N(0, std) weights (also the untied
        output weights and the clusters' head logits), zero biases, LayerNorm gains N(1, std)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, std)
                nn.init.zeros_(m.bias)
        for p in (self.r_w_bias, self.r_r_bias, self.crit.cluster_weight):
            if p is not None:
                nn.init.normal_(p, 0.0, std)
        if self.crit.weight is not self.word_emb.weight:
            nn.init.normal_(self.crit.weight, 0.0, std)

    def _pos_emb(self, klen: int, clamp_len: int, device, dtype) -> Tensor:
        pos = torch.arange(klen - 1, -1, -1.0, device=device)
        if clamp_len > 0:
            pos = pos.clamp(max=clamp_len)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.d_model, 2.0, device=device) / self.d_model)
        angles = pos[:, None] * inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], -1).to(dtype)

    @staticmethod
    def _mask(qlen: int, mlen: int, ctx: Context, device) -> Tensor:
        """True where query i (position mlen + i of the keys) must not see key j: the future, and
        with same_length everything mem_len or more positions back (as the original's mask)."""
        i = torch.arange(qlen, device=device)[:, None] + mlen
        j = torch.arange(mlen + qlen, device=device)[None, :]
        mask = j > i
        if ctx.same_length:
            mask |= j <= i - ctx.mem_len
        return mask

    def transformer(self, inputs: Tensor, mems: Mems | None = None, context: Context | None = None
                    ) -> tuple[Tensor, Mems | None]:
        ctx = context or self.context
        qlen = inputs.size(1)
        mlen = mems[0].size(1) if mems else 0
        h = self.drop(self.word_emb(inputs) * self.d_model ** 0.5)
        mask = self._mask(qlen, mlen, ctx, inputs.device)
        r = self.drop(self._pos_emb(mlen + qlen, ctx.clamp_len, h.device, h.dtype))
        hids = []
        for i, layer in enumerate(self.layers):
            hids.append(h)
            h = layer(h, r, self.r_w_bias, self.r_r_bias, mask, mems[i] if mems else None)
        return self.drop(h), self._update_mems(hids, mems, ctx.mem_len)

    @staticmethod
    def _update_mems(hids: Mems, mems: Mems | None, mem_len: int) -> Mems | None:
        """The last `mem_len` layer inputs over (old mems, this segment), detached."""
        if mem_len <= 0:
            return None
        with torch.no_grad():
            cat = hids if not mems else [torch.cat([m, h], 1) for m, h in zip(mems, hids)]
            return [c[:, -mem_len:].detach() for c in cat]

    def nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (float32), shaped as `targets`."""
        return self.crit(hidden.reshape(-1, self.d_model), targets.reshape(-1)).view_as(targets)

    def forward(self, inputs: Tensor, targets: Tensor, mems: Mems | None = None,
                context: Context | None = None) -> tuple[Tensor, Mems | None]:
        hidden, new_mems = self.transformer(inputs, mems, context)
        return self.nll(hidden, targets), new_mems
