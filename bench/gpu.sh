#!/usr/bin/env bash
# On a GPU machine without a package index, from the repository root, with .whl/ from bench/wheels.sh:
# installs the carried wheels beside the image's torch and Lightning, runs bench/gpu_smoke.py (every device
# path of lab once, ~4 minutes) and then the benches.
#   bash bench/gpu.sh                      the smoke checks, every part of bench/run.py --gpu, bench/overhead.py
#   bash bench/gpu.sh --only cnn --only resnet      the smoke checks, then bench/run.py's parts only
#   SMOKE=0 bash bench/gpu.sh --only sweep          without the smoke checks (each part fits in 10 minutes)
#   SMOKE=only bash bench/gpu.sh                    the smoke checks alone
# Results are appended to bench/RESULTS.md and, when $OUT is set, copied there with the full log.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/bench-gpu.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, pytorch_lightning, torchmetrics, optuna, mlflow, hydra; print('torch', torch.__version__, \
'lightning', pytorch_lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'optuna', optuna.__version__, \
'mlflow', mlflow.__version__)"
  [ "${SMOKE:-1}" = 0 ] || python3 bench/gpu_smoke.py || echo "gpu_smoke: a check failed (above); the benches run on"
  [ "${SMOKE:-1}" = only ] && exit 0
  python3 bench/run.py --gpu "$@"
  [ $# -gt 0 ] || python3 bench/overhead.py
} 2>&1 | tee "$log"
[ -z "${OUT:-}" ] || cp bench/RESULTS.md "$OUT/"
