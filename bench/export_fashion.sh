#!/usr/bin/env bash
# The Fashion-MNIST CNN (conf/experiment/fashion_mnist_cnn.yaml, EPOCHS epochs) exported float / int8 / pruned 50%
# (unstructured and structured, one fine-tune epoch each) and int8 of the structured one; each `lab export`
# prints its table (test accuracy on the 10,000 test images, size, CPU latency at batch 1). bench/RESULTS.md
# holds a run of it. Usage: bench/export_fashion.sh [OUT_DIR]   (default runs/export_bench)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/export_bench}
EPOCHS=${EPOCHS:-3}
LAB=${LAB:-.venv/bin/lab}
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
$LAB train experiment=fashion_mnist_cnn trainer.max_epochs="$EPOCHS" trainer.enable_progress_bar=false \
  mlflow.run_name=export-bench hydra.run.dir="$OUT/train" | tee "$OUT/train.txt"
RUN=$(.venv/bin/python -c "
from mlflow.tracking import MlflowClient
c = MlflowClient()
e = c.get_experiment_by_name('fashion_mnist_cnn')
print(c.search_runs([e.experiment_id], \"attributes.run_name = 'export-bench'\", order_by=['start_time DESC'])[0].info.run_id)")
for variant in "" "--quantize int8" "--prune 0.5" "--prune 0.5 --structured" "--prune 0.5 --structured --quantize int8"; do
  name=$(echo "fashion $variant" | tr -s ' -' '_'); [ "$name" = fashion_ ] && name=fashion_float
  echo "== lab export $RUN $variant"
  # shellcheck disable=SC2086 - the variant's words are separate options
  $LAB export "$RUN" $variant --out "$OUT/$name.onnx"
done 2>&1 | tee "$OUT/export.txt"
