"""Transformer-XL (Dai et al., 2019) as in its official PyTorch code (mem_transformer.py, attn_type 0).

What makes it Transformer-XL:
  * segment-level recurrence: each layer also attends over `mem_len` cached hidden states of the
    previous segments (the layer inputs, detached: no gradient flows into the past);
  * relative positional attention: score(i, j) = (q_i + u) k_j + (q_i + v) W_r R_{i-j}, with
    sinusoidal R, and u = r_w_bias, v = r_r_bias learned per head and shared by all layers.
Post-LN by default (LayerNorm(x + sublayer(x)), as the original base model), pre-LN with
`pre_lnorm=True`. Output: a softmax tied to the input embedding (with its own bias), or
torch.nn.AdaptiveLogSoftmaxWithLoss when `adaptive_cutoffs` is given (untied; with div_value 1 it
adds a d_model x d_model projection per tail cluster that the original's div_val=1 does not have).
Shapes are batch-first here: (batch, time, d_model). Not included: same_length attention,
ext_len, sampled softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mems = list[Tensor]  # one (batch, mlen, d_model) tensor per layer


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
        self.core = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.layer_norm = nn.LayerNorm(d_model)

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
    `model.transformer(inputs, mems)` -> (last hidden states (B, L, d_model), new mems)."""

    def __init__(self, n_token: int, n_layer: int = 16, d_model: int = 410, n_head: int = 10, d_head: int = 41,
                 d_inner: int = 2100, dropout: float = 0.1, dropatt: float = 0.0, mem_len: int = 150,
                 clamp_len: int = -1, pre_lnorm: bool = False, adaptive_cutoffs: list[int] | None = None,
                 init_std: float = 0.02):
        super().__init__()
        self.d_model, self.mem_len, self.clamp_len = d_model, mem_len, clamp_len
        self.word_emb = nn.Embedding(n_token, d_model)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_head, d_head, d_inner, dropout, dropatt, pre_lnorm)
                                    for _ in range(n_layer))
        self.drop = nn.Dropout(dropout)
        if adaptive_cutoffs:
            self.crit = nn.AdaptiveLogSoftmaxWithLoss(d_model, n_token, list(adaptive_cutoffs), div_value=1.0)
            self.out_bias = None
        else:
            self.crit = None
            self.out_bias = nn.Parameter(torch.zeros(n_token))  # the tied softmax: logits = h E^T + b
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        """As the original's weights_init with init='normal': N(0, std) weights, zero biases,
        LayerNorm gains N(1, std)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, std)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.r_w_bias, 0.0, std)
        nn.init.normal_(self.r_r_bias, 0.0, std)

    def _pos_emb(self, klen: int, device, dtype) -> Tensor:
        pos = torch.arange(klen - 1, -1, -1.0, device=device)
        if self.clamp_len > 0:
            pos = pos.clamp(max=self.clamp_len)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.d_model, 2.0, device=device) / self.d_model)
        angles = pos[:, None] * inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], -1).to(dtype)

    def transformer(self, inputs: Tensor, mems: Mems | None = None, mem_len: int | None = None) -> tuple[Tensor, Mems | None]:
        mem_len = self.mem_len if mem_len is None else mem_len
        qlen = inputs.size(1)
        mlen = mems[0].size(1) if mems else 0
        klen = mlen + qlen
        h = self.drop(self.word_emb(inputs) * self.d_model ** 0.5)
        mask = torch.ones(qlen, klen, dtype=torch.bool, device=inputs.device).triu(1 + mlen)
        r = self.drop(self._pos_emb(klen, h.device, h.dtype))
        hids = []
        for i, layer in enumerate(self.layers):
            hids.append(h)
            h = layer(h, r, self.r_w_bias, self.r_r_bias, mask, mems[i] if mems else None)
        return self.drop(h), self._update_mems(hids, mems, mem_len)

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
        flat, tgt = hidden.reshape(-1, self.d_model), targets.reshape(-1)
        if self.crit is None:
            logits = F.linear(flat, self.word_emb.weight, self.out_bias)
            return F.cross_entropy(logits.float(), tgt, reduction="none").view_as(targets)
        nll = -self.crit(flat.float(), tgt).output
        if self.training:
            # A tail cluster with no target in the batch gets no gradient; DDP (which the shared
            # loop builds without find_unused_parameters) needs every parameter in the graph.
            nll = nll + 0.0 * sum(p.reshape(-1)[0] for p in self.crit.tail.parameters())
        return nll.view_as(targets)

    def forward(self, inputs: Tensor, targets: Tensor, mems: Mems | None = None,
                mem_len: int | None = None) -> tuple[Tensor, Mems | None]:
        hidden, new_mems = self.transformer(inputs, mems, mem_len)
        return self.nll(hidden, targets), new_mems
