"""Which keys of a run's config define what it trains, how two configs of one run differ, and the
directory a config's run lives in.

A run directory holds one training. Its resolved config has three kinds of key:

- training keys (everything not listed below): what is trained. A resume refuses any change to
  them, and they (with the length keys) are the run's identity.
- LENGTH_KEYS: how long it trains. `resume=true` may change them (more steps, more epochs).
- OBSERVE_KEYS: how the run is watched, stored or executed (logging, checkpoints, paths, loader
  workers, device, compilation). They may change at any resume and are not part of the identity.
- `sources` entries document where recipe values come from and never change training.

A run's identity is its training and length keys: `identity_hash` is a short hash of them, and
the `${run_dir:PREFIX}` resolver (conf/config.yaml's hydra.run.dir and hydra.sweep.subdir) puts
each config's run in `PREFIX-<hash>`, so the same command finds its run again (to skip, resume or
start it) and two configs never share a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, OmegaConf

OBSERVE_KEYS = (
    "paths.*", "logger.*",
    "trainer.log_every", "trainer.eval_every", "trainer.ckpt_every", "trainer.diagnostics_every",
    "trainer.progress", "trainer.device", "trainer.compile", "optim.fused",
    "task.data.root", "task.data.fixture_root", "task.data.cache_dir", "task.data.num_workers",
)
LENGTH_KEYS = ("trainer.max_steps", "trainer.max_epochs")
DOC_KEY = "sources"


class _Absent:
    """Stands for a key that one of two compared configs does not have."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


#: what a command does with its run directory, not part of any run's config
COMMAND_KEYS = ("resume", "overwrite")


def key_kind(key: str) -> str:
    """'doc', 'command', 'observe', 'length' or 'training' for a dotted key."""
    if DOC_KEY in key.split("."):
        return "doc"
    if key in COMMAND_KEYS:
        return "command"
    if any(fnmatchcase(key, pattern) for pattern in OBSERVE_KEYS):
        return "observe"
    if key in LENGTH_KEYS:
        return "length"
    return "training"


def flatten(cfg: DictConfig | dict) -> dict[str, Any]:
    """Dotted key -> plain value of every leaf (lists are leaves), interpolations resolved. A
    config that cannot be resolved as a whole (a key whose interpolation fails) is flattened
    unresolved, so such a key compares by its text."""
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - any resolution failure: compare the raw text instead
            cfg = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(cfg, "")
    return out


def differences(old: DictConfig | dict, new: DictConfig | dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two configs: key -> (old, new); a key only
    one of them has shows ABSENT on the other side. Documentation and command keys are left out."""
    a, b = flatten(old), flatten(new)
    out = {}
    for key in set(a) | set(b):
        if key_kind(key) in ("doc", "command"):
            continue
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va != vb:
            out[key] = (va, vb)

    def order(key: str) -> tuple:
        # What says most in a short message first: names and top-level keys (optim.name, seed),
        # then values both configs have (class paths such as _target_ last), then keys only one
        # has (another optimizer's arguments).
        named = key.endswith(".name") or "." not in key
        return (not named, ABSENT in out[key], key.rsplit(".", 1)[-1].startswith("_"), key)

    return {key: out[key] for key in sorted(out, key=order)}


def override_key(override: str) -> str:
    """The key (or config group) of one command-line override: `+optim.foo=1` -> `optim.foo`."""
    return override.split("=", 1)[0].lstrip("~+")


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """The keys that make a run what it is (training and length keys), resolved."""
    return {k: v for k, v in flatten(cfg).items() if key_kind(k) in ("training", "length")}


def identity_hash(cfg: DictConfig | dict, length: int = 8) -> str:
    text = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_dir_resolver(prefix: str, *, _root_: DictConfig) -> str:
    """`${run_dir:PREFIX}`: the absolute directory PREFIX-<identity hash of the config, without its
    hydra node>. Absolute, so that as hydra.sweep.subdir it puts a sweep's cells beside single
    runs (os.path.join drops the sweep directory before an absolute path)."""
    body = OmegaConf.to_container(_root_, resolve=False)
    body.pop("hydra", None)
    return os.path.abspath(f"{prefix}-{identity_hash(OmegaConf.create(body))}")
