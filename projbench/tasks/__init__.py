"""Tasks: one module per task, each a `Task` subclass named by `task._target_` in its config."""
