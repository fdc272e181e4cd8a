#!/usr/bin/env bash
# The GPU half of the optimizer issue (#2) and the loop benchmark's GPU run, in one command on a
# lent GPU machine: the optimizer tests with their CUDA cases, the
# detectors' CUDA cases (deformable convolution against the CPU, bf16 and channels_last training
# steps of CenterNet and the BatchNorm SSD), the optimizer step benchmark against torch's fused
# AdamW / foreach SGD, and the training-loop overhead benchmark. Not yet run on a GPU; my
# estimate is 5 minutes once the machine is up.
#
#   here:   make device-wheels                 # pure-Python wheels the GPU image lacks -> .whl/
#   there:  bash scripts/device_checks.sh      # run with .whl carried; reports go to $OUT
#
# The GPU image already has torch, torchvision, timm, torchmetrics and pytest (KINDS.md); .whl/
# adds adamp (the reference for the tests and the benchmark), hydra-core, omegaconf and antlr4.
# Each step has its own time limit (together 570 s, inside the device tool's 600 s a command); a
# failed or timed-out step does not stop the next, and the exit status
# says whether all passed. Copy the reports into results/ and commit them.
set -uo pipefail
out=${OUT:-results}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_checks: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'device_checks: no CUDA device here; these checks need a GPU')" \
    || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device_gpu.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2; shift 2
    echo "== $name ($*)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed with exit code $rc"; status=1; }
}
step test_optim 120 "$py" -m pytest -q -p no:cacheprovider tests/test_optim.py
step test_detectors 90 "$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_centernet.py tests/test_ssd.py
# ResNet-50 with filter-orthogonal gradients (as in training); torch.compile'd steps compile first
step bench_optim 150 "$py" scripts/bench_optim.py --device cuda --models resnet50 --grads invariant --rounds 50 \
    --out "$out/bench_optim_cuda.md"
step bench_train 120 "$py" scripts/bench_train.py --device cuda --model resnet50 --batch-size 256 \
    --precision bf16 --channels-last --steps 50 --rounds 3 --out "$out/bench_train_cuda.md"
# Table 4a's cost: WRN-34-10 PGD-10 adversarial training steps/s -> device-hours a run (README, Table 4a)
step adv_training_cost 90 "$py" scripts/adv_training_cost.py --device cuda --steps 20 \
    --out "$out/adv_training_cost_cuda.md"
exit $status
