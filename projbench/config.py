"""OmegaConf resolvers that the config files use; registered when projbench is imported, so the
CLI, Hydra's compose API in tests and projbench.tables (reading saved runs) all resolve them.

`${run_dir:PREFIX}` (conf/config.yaml's hydra.run.dir) is PREFIX-<hash of the config's training
keys>, absolute: one directory per config (projbench/runconfig.py).

`${fixture:A,B}` is A when the run trains on its task's fixture (`task.data.fixture=true`) and B
otherwise. A task file uses it for the settings a tiny fixture needs (batch size, image size,
worker count), so `task.data.fixture=true` alone gives a quick run while the real-data values
stay the recipe's; a value given on the command line replaces the whole expression, as any
override does.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from projbench.decay import register_resolvers as register_decay_resolvers
from projbench.runconfig import run_dir_resolver


def _fixture(on_fixture: Any, otherwise: Any, *, _root_) -> Any:
    return on_fixture if OmegaConf.select(_root_, "task.data.fixture", default=False) else otherwise


OmegaConf.register_new_resolver("fixture", _fixture, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir_resolver, replace=True)
# `${projbench.weight_decay:}` and `${projbench.decay_per_step:}` of conf/optim/*.yaml
register_decay_resolvers()
