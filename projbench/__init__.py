"""projbench."""
