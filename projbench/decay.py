"""Weight decay as a recipe's source states it, and as each optimizer takes it.

Papers and codebases write "weight decay 1e-4" in different conventions, and the same number
means very different decay in each: the AdamP paper writes decay as the AdamW paper does, per
step `w <- (1 - wd) w`, while PyTorch's AdamW (and the official AdamP) apply `w <- (1 - lr * wd) w`;
the maintainer's answer in clovaai/AdamP issue #10 is that the paper's 1e-4 is `weight_decay=0.1`
at `lr=1e-3`. So a recipe states its decay with its convention (`optim.decay: {value,
convention}`), and this module is the one place that turns it into the optimizer's own
`weight_decay` argument (the `projbench.weight_decay` resolver of conf/optim/*.yaml).

Conventions a source may state (CONVENTIONS); optimizers apply their argument by one of the
first, third and fourth (RULES). "Per step" below is the fraction by which decay shrinks a
weight in one step at the base learning rate (the start of the schedule); every convention
scales with the schedule's factor, so matching it at the start matches it at every step.

- coupled: L2 on the gradient, `g <- g + wd * w`. Under momentum SGD the decay part of the
  update settles to `lr * wd * (1 - dampening) / (1 - momentum)` per step (`(1 - momentum *
  dampening) / (1 - momentum)` with Nesterov); under Adam it is divided by the gradient's second
  moment and has no per-step equivalent, so it converts to nothing else there.
- decoupled: per step `wd` (the AdamW paper, Loshchilov & Hutter 2019; the AdamP paper).
- decoupled_lr: per step `lr * wd` (torch.optim.AdamW, AdamP).
- decoupled_lr_momentum: per step `lr * wd / (1 - momentum)` (the official SGDP). Its
  `1 / (1 - momentum)` is what makes SGDP's `weight_decay=1e-4` match SGD's coupled 1e-4: both
  shrink a weight by `lr * 1e-4 / (1 - momentum)` per step once SGD's momentum buffer holds the
  decay term in steady state (1e-4 per step at lr 0.1, momentum 0.9).
- native: the value is the optimizer's own argument, whatever its rule (an upstream that passes
  one number to whichever optimizer it is given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from projbench.errors import ConfigError

CONVENTIONS = {
    "coupled": "L2 added to the gradient, g <- g + wd * w (torch SGD / Adam weight_decay)",
    "decoupled": "per step w <- (1 - wd) w, times the schedule's factor (the AdamW paper's and the AdamP paper's notation)",
    "decoupled_lr": "w <- (1 - lr * wd) w (torch AdamW / AdamP weight_decay)",
    "decoupled_lr_momentum": "w <- (1 - lr * wd / (1 - momentum)) w (the official SGDP's weight_decay)",
    "native": "the optimizer's own weight_decay argument, passed unchanged",
}


@dataclass(frozen=True)
class Rule:
    """How an optimizer applies its `weight_decay` argument."""

    convention: str  # coupled | decoupled_lr | decoupled_lr_momentum
    family: str      # sgd: momentum SGD (coupled L2 has a steady-state per-step equivalent) | adam: none


# By the `_target_` of conf/optim/*.yaml. Another optimizer class may declare
# `weight_decay_rule = (convention, family)` instead of being listed here.
RULES = {
    "torch.optim.SGD": Rule("coupled", "sgd"),
    "torch.optim.Adam": Rule("coupled", "adam"),
    "torch.optim.AdamW": Rule("decoupled_lr", "adam"),
    "projbench.optim.AdamP": Rule("decoupled_lr", "adam"),
    "projbench.optim.SGDP": Rule("decoupled_lr_momentum", "sgd"),
    "adamp.AdamP": Rule("decoupled_lr", "adam"),
    "adamp.SGDP": Rule("decoupled_lr_momentum", "sgd"),
    # timm 1.0.31 (each module's step): w *= 1 - lr * wd before the step (Lion, NAdamW, Muon, whose
    # AdamW fallback for 1-D weights too), inside it (Mars: p * wd added to the update times lr),
    # after it (LaProp), or Adan's proximal w <- (w - step) / (1 + lr * wd): lr * wd per step to
    # first order in every case.
    "timm.optim.Lion": Rule("decoupled_lr", "adam"),
    "timm.optim.NAdamW": Rule("decoupled_lr", "adam"),
    "timm.optim.Muon": Rule("decoupled_lr", "adam"),
    "timm.optim.Mars": Rule("decoupled_lr", "adam"),
    "timm.optim.LaProp": Rule("decoupled_lr", "adam"),
    "timm.optim.Adan": Rule("decoupled_lr", "adam"),
}

# timm classes whose rule depends on one of their arguments: (argument, rule when true, when false).
# Lamb without decoupled_decay adds wd * w to the update inside its trust ratio, which none of the
# conventions describes (None: state its decay as native); Adopt without decoupled is L2.
SWITCHED = {
    "timm.optim.Lamb": ("decoupled_decay", Rule("decoupled_lr", "adam"), None),
    "timm.optim.Adopt": ("decoupled", Rule("decoupled_lr", "adam"), Rule("coupled", "adam")),
}

# The projection wrapper (projbench/optim/wrapper.py) owns the decay, w *= 1 - lr * wd * ratio,
# around any inner optimizer: decoupled_lr, converting from coupled L2 as its inner optimizer's
# family allows (momentum SGD: in steady state; Adam-like: not at all).
WRAPPER = "projbench.optim.Projected"


@dataclass(frozen=True)
class Context:
    """What the conversion needs to know about the optimizer a recipe runs."""

    target: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    inner: str | None = None     # the class the projection wrapper wraps
    switches: tuple[tuple[str, bool], ...] = ()  # the SWITCHED arguments given, with their values

    @classmethod
    def of(cls, optim: DictConfig) -> "Context":
        """From a conf/optim node (interpolations resolved)."""
        inner = optim.get("inner") if str(optim._target_) == WRAPPER else None
        switches = tuple((arg, bool(optim[arg])) for arg, *_ in SWITCHED.values() if optim.get(arg) is not None)
        return cls(target=str(optim._target_), lr=float(optim.lr), momentum=float(optim.get("momentum") or 0.0),
                   dampening=float(optim.get("dampening") or 0.0), nesterov=bool(optim.get("nesterov") or False),
                   inner=None if inner is None else str(inner), switches=switches)


def rule_of(ctx: Context) -> Rule | None:
    """The decay rule of the optimizer `ctx` describes (None: unknown): its class's, that of the
    class with its switch argument as given, or the wrapper's around its inner class."""
    if ctx.target == WRAPPER:
        inner = rule_of(Context(ctx.inner, ctx.lr, switches=ctx.switches)) if ctx.inner else None
        return Rule("decoupled_lr", inner.family if inner is not None else "adam")
    if ctx.target in SWITCHED:
        arg, when_true, when_false = SWITCHED[ctx.target]
        return when_true if dict(ctx.switches).get(arg, False) else when_false
    return rule_for(ctx.target)


def rule_for(target: str) -> Rule | None:
    """The decay rule of the optimizer class `target` (None: unknown)."""
    if target in RULES:
        return RULES[target]
    from hydra.utils import get_class  # only for classes outside RULES: imports the class

    try:
        declared = getattr(get_class(target), "weight_decay_rule", None)
    except Exception:  # noqa: BLE001 - an unimportable class is reported by build_optimizer
        return None
    return Rule(*declared) if declared is not None else None


def _steady_state_factor(ctx: Context) -> float:
    """Per-step decay of momentum SGD with coupled L2 `wd`, divided by `lr * wd`."""
    m, d = ctx.momentum, ctx.dampening
    return (1 - m * d) / (1 - m) if ctx.nesterov else (1 - d) / (1 - m)


def _per_step(value: float, convention: str, family: str, ctx: Context) -> float | None:
    """The per-step shrink at the base lr of decay `value` in `convention` (None: no equivalent)."""
    if convention == "decoupled":
        return value
    if convention == "decoupled_lr":
        return ctx.lr * value
    if family != "sgd":
        return None  # coupled L2 under Adam; the SGDP convention needs a momentum
    if convention == "decoupled_lr_momentum":
        return ctx.lr * value / (1 - ctx.momentum)
    return ctx.lr * value * _steady_state_factor(ctx)  # coupled


def _argument_for(per_step: float, rule: Rule, ctx: Context) -> float | None:
    """The optimizer argument that gives `per_step` (None: no equivalent)."""
    if rule.convention == "decoupled_lr":
        return per_step / ctx.lr
    if rule.family != "sgd":
        return None
    if rule.convention == "decoupled_lr_momentum":
        return per_step * (1 - ctx.momentum) / ctx.lr
    return per_step / (ctx.lr * _steady_state_factor(ctx))


def _tidy(x: float) -> float:
    """Round away the last bits of float noise (1e-4 / 1e-3 = 0.09999999999999999 -> 0.1)."""
    return float(f"{x:.12g}")


def _check_momentum(ctx: Context) -> None:
    if not 0.0 <= ctx.momentum < 1.0:
        raise ConfigError("optim.momentum", f"must be in [0, 1) to convert weight decay, got {ctx.momentum}")


def optimizer_weight_decay(value: float, convention: str, ctx: Context) -> float:
    """The `weight_decay` argument of `ctx.target` for decay `value` stated in `convention`."""
    if convention not in CONVENTIONS:
        raise ConfigError("optim.decay.convention", f"got {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if value is None or value < 0:
        raise ConfigError("optim.decay.value", f"must be >= 0, got {value}")
    if value == 0 or convention == "native":
        return float(value)
    rule = rule_of(ctx)
    if rule is None:
        raise ConfigError("optim.decay", f"{ctx.target} has no known weight-decay rule, so decay stated as "
                                         f"{convention} cannot be converted; state it as native (its own argument) "
                                         "or add the class to projbench/decay.py RULES")
    if convention == rule.convention:
        return float(value)
    _check_momentum(ctx)
    if ctx.lr <= 0:
        raise ConfigError("optim.lr", f"must be > 0, got {ctx.lr}")
    per_step = _per_step(value, convention, rule.family, ctx)
    argument = None if per_step is None else _argument_for(per_step, rule, ctx)
    if argument is None:
        raise ConfigError("optim.decay", f"{convention} decay has no equivalent for {ctx.target}, which applies "
                                         f"{rule.convention} decay (coupled L2 under Adam passes through its "
                                         "normalisation and has no per-step equivalent); state it in a convention "
                                         "this optimizer can take, or as native to pass the value unchanged")
    return _tidy(argument)


def decay_per_step(weight_decay: float, ctx: Context) -> float | None:
    """The per-step shrink at the base lr that the optimizer argument `weight_decay` gives
    (None: coupled L2 under Adam, or an optimizer without a known rule)."""
    if weight_decay == 0:
        return 0.0
    rule = rule_of(ctx)
    if rule is None:
        return None
    _check_momentum(ctx)
    per_step = _per_step(weight_decay, rule.convention, rule.family, ctx)
    return None if per_step is None else _tidy(per_step)


def stated(optim: DictConfig) -> tuple[float, str] | None:
    """(value, convention) of `optim.decay`, or None when the node has no `decay`."""
    decay = optim.get("decay")
    if decay is None:
        return None
    return decay.value, str(decay.convention)


def check(optim: DictConfig) -> None:
    """Fail with a ConfigError naming the key when `optim.decay` cannot be converted (run before
    anything reads `optim.weight_decay`, whose resolver would raise it less readably)."""
    decay = stated(optim)
    if decay is not None:
        optimizer_weight_decay(decay[0], decay[1], Context.of(optim))


# -- resolvers (conf/optim/*.yaml) ----------------------------------------------------------------
def _weight_decay_resolver(*, _parent_: Any) -> float:
    value, convention = stated(_parent_)
    return optimizer_weight_decay(value, convention, Context.of(_parent_))


def _per_step_resolver(*, _parent_: Any) -> float | None:
    return decay_per_step(float(_parent_.weight_decay), Context.of(_parent_))


def register_resolvers() -> None:
    """`${projbench.weight_decay:}` and `${projbench.decay_per_step:}`, read from the optim node
    that holds them. Registered by projbench/config.py on `import projbench`, so the CLI, Hydra's compose API in tests
    and projbench.tables (reading saved .hydra/config.yaml files) all resolve them."""
    for name, fn in (("projbench.weight_decay", _weight_decay_resolver),
                     ("projbench.decay_per_step", _per_step_resolver)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
