"""projbench."""

from projbench import config as _config  # noqa: F401  (registers the config resolvers)
