"""projbench.

Importing the package registers the config resolvers its configs use (projbench/decay.py), so
every reader of a projbench config (the CLI, Hydra's compose API, projbench.tables on saved
runs) resolves them.
"""

from projbench.decay import register_resolvers

register_resolvers()
