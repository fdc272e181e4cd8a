"""Reading a local pretrained state dict (ImageNet initialisation; nothing is ever downloaded),
with one-line errors that name `task.model.pretrained` and the file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from projbench.errors import ConfigError

KEY = "task.model.pretrained"


def read_state_dict(path: str | Path, expected: str) -> dict[str, Tensor]:
    """The tensors of the state dict at `path` (also when nested under 'state_dict' or 'model', or
    saved from a DataParallel / DDP model with 'module.' prefixes). `expected` says what the file
    should be (e.g. "a torchvision ResNet state dict (e.g. resnet18-f37072fd.pth)") in the errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(KEY, f"{path}: not found; expected {expected}; null trains from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for a foreign file
        raise ConfigError(KEY, f"{path}: cannot be loaded as a state dict ({exc})") from None
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(KEY, f"{path}: holds a {type(state).__name__}, not a state dict; expected {expected}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_exactly(module: nn.Module, state: dict[str, Tensor], path: str | Path, expected: str) -> None:
    """`state` into `module`, every key and shape matching both ways, or a ConfigError naming
    the first mismatches."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        reason = str(exc).splitlines()[-1].strip()
        raise ConfigError(KEY, f"{path}: does not fit: expected {expected} ({reason})") from None
    if missing or unexpected:
        raise ConfigError(KEY, f"{path}: does not fit: expected {expected}; missing {list(missing)[:4]}, "
                               f"unexpected {list(unexpected)[:4]} ({len(missing)} / {len(unexpected)} keys)")
