"""First-step cost of the multi-tensor step (`fused`): building its CPU kernel with an empty cache
against loading it from the cache, on ResNet-50's parameters, each case in a fresh process.

    .venv/bin/python scripts/bench_compile.py

The kernel is compiled once per machine (per kernel version, compiler and CPU) into
$PROJBENCH_KERNEL_CACHE (default ~/.cache/projbench/kernels) and loaded from there by every later
process (projbench/optim/cpu_kernel.py). Here the cache is a fresh temporary folder: the first
process builds (SGDP and AdamP share one kernel, so SGDP's first step builds it and AdamP's, in the
same process, finds it loaded), the second process loads it from the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One process: the first two steps of SGDP and AdamP on ResNet-50 (random gradients), in seconds.
CHILD = """
import json, time, torch, torchvision
from projbench.optim import SGDP, AdamP
out = {}
for cls, kw in ((SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)), (AdamP, dict(lr=1e-3, weight_decay=1e-2))):
    model = torchvision.models.resnet50()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = cls(model.parameters(), fused=True, **kw)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    out[cls.__name__] = times
print(json.dumps(out))
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PROJBENCH_KERNEL_CACHE": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for case in ("first process, empty cache", "second process, cache filled"):
            result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
            for name, (first, second) in json.loads(result.stdout.splitlines()[-1]).items():
                print(f"{name}(fused=True), resnet50, {case}: first step {first:.2f} s, second {second * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
