"""First-step cost of `compiled=True`: how long SGDP / AdamP's first step() on ResNet-50's
parameters takes (torch.compile traces and builds its kernels there) against the second one.

    .venv/bin/python scripts/bench_compile.py                                      # warm Inductor cache
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python scripts/bench_compile.py  # cold cache

Inductor caches compiled kernels on disk (TORCHINDUCTOR_CACHE_DIR, by default under /tmp), so a
run's second process pays less than its first.
"""

from __future__ import annotations

import time

import torch
import torchvision

from projbench.optim import SGDP, AdamP


def main() -> None:
    torch.manual_seed(0)
    for cls, kwargs in ((SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
                        (AdamP, dict(lr=1e-3, weight_decay=1e-2))):
        model = torchvision.models.resnet50()
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = cls(model.parameters(), compiled=True, **kwargs)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        print(f"{cls.__name__}(compiled=True), resnet50: first step {times[0]:.1f} s, second {times[1] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
