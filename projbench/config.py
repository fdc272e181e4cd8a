"""OmegaConf resolvers that the config files use; registered when projbench is imported, so the
CLI, Hydra's compose API in tests and projbench.tables (reading saved runs) all resolve them.

`${run_dir:PREFIX}` (conf/config.yaml's hydra.run.dir) is PREFIX-<hash of the config's training
keys>, absolute: one directory per config (projbench/runconfig.py).

`${fixture:A,B}` is A when the run trains on its task's fixture (`task.data.fixture=true`) and B
otherwise. A task file uses it for the settings a tiny fixture needs (batch size, image size,
worker count), so `task.data.fixture=true` alone gives a quick run while the real-data values
stay the recipe's; a value given on the command line replaces the whole expression, as any
override does.

`${projbench.optim_entry:ROW,KEY}` is KEY of this run's optimizer's entry in the recipe row ROW
(a node keyed by optimizer name, e.g. `task.recipes.${task.recipe}` of task=imagenet). An
optimizer the row has no entry for takes the entry its config names in `optim.recipe_as`: the
first of `recipe_as.entries` the row has, with the lr times `recipe_as.lr_factor[<entry>]`
(default 1), decay stated in an lr-proportional convention divided by it (the per-step decay
stays), and every `sources.*` string saying so and why (`recipe_as.why[<entry>]`); e.g. lion:
the row's AdamW entry, lr x 0.1, the Lion paper's advice. A projected optimizer lists its base
first (lion_p: lion, then adamw).
A key the entry lacks (nesterov for Adam) is null, which build_optimizer does not pass on.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from projbench.decay import register_resolvers as register_decay_resolvers
from projbench.errors import ConfigError
from projbench.runconfig import run_dir_resolver

# Decay conventions (projbench/decay.py) whose per-step decay is proportional to the lr.
LR_PROPORTIONAL = ("coupled", "decoupled_lr", "decoupled_lr_momentum")


def _fixture(on_fixture: Any, otherwise: Any, *, _root_) -> Any:
    return on_fixture if OmegaConf.select(_root_, "task.data.fixture", default=False) else otherwise


def optim_entry_name(row: DictConfig, optim: DictConfig, row_path: str = "the recipe row") -> str:
    """The name of the entry of `row` that the optimizer `optim` takes its recipe values from."""
    fallback = optim.get("recipe_as") or {}
    names = [str(optim.name), *(fallback.get("entries") or [])]
    for name in names:
        if name in row:
            return name
    raise ConfigError(row_path, f"has no entry for optim={optim.name}" + (f" nor for {', '.join(names[1:])}"
                      if len(names) > 1 else "") + "; add one, or give optim.recipe_as.entries an entry it has")


def _optim_entry(row_path: str, key: str, *, _root_) -> Any:
    optim, row = _root_.optim, OmegaConf.select(_root_, row_path)
    if row is None:
        raise ConfigError(row_path, "no such recipe row")
    name = optim_entry_name(row, optim, row_path)
    value = OmegaConf.select(row[name], key, default=None)
    if name == optim.name or value is None:
        return value
    factor = float((optim.recipe_as.get("lr_factor") or {}).get(name, 1.0))
    # decay stated in a convention whose per-step decay is proportional to lr keeps it: value / factor
    decay_scaled = factor != 1.0 and OmegaConf.select(row[name], "decay.convention") in LR_PROPORTIONAL
    if key == "lr":
        return value * factor
    if key == "decay.value" and decay_scaled:
        return value / factor
    if key.startswith("sources."):
        scaled = {"sources.lr": f", lr x {factor:g}" if factor != 1.0 else "",
                  "sources.decay": f", decay / {factor:g} (the same lr * wd)" if decay_scaled else ""}.get(key, "")
        why = (optim.recipe_as.get("why") or {}).get(name, f"conf/optim/{optim.name}.yaml")
        return f"{optim.name} has no entry here: {name}'s{scaled} ({why}); {name}'s source: {value}"
    return value


OmegaConf.register_new_resolver("fixture", _fixture, replace=True)
OmegaConf.register_new_resolver("projbench.optim_entry", _optim_entry, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir_resolver, replace=True)
# `${projbench.weight_decay:}` and `${projbench.decay_per_step:}` of conf/optim/*.yaml
register_decay_resolvers()
