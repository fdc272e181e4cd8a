"""Readers of each data set's official on-disk layout, and writers of tiny fixtures in those
layouts (projbench/data/fixtures.py) for tests and smoke runs."""
