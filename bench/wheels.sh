#!/usr/bin/env bash
# Fills .whl/ with the wheels `bench/gpu.sh` installs on a GPU machine that has no package index: optuna,
# mlflow, hydra-core, cmaes and those of their dependencies that the machine's image lacks (its Python
# 3.12 already holds torch, Lightning, torchmetrics, numpy, pandas, pyarrow, scipy, scikit-learn and
# matplotlib). Versions are the ones installed in .venv, i.e. what CI tests. Run here: ~35 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
PYV=${PYV:-3.12}  # the GPU image's Python
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }

# Packages the GPU image already has (its package list as read on 2026-11-17): not carried, so that the
# image's builds of them stay in use.
PRESENT="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click cloudpickle
contourpy cycler fonttools frozenlist h11 idna jinja2 joblib kiwisolver markupsafe matplotlib multidict narwhals
numpy packaging pandas pillow propcache protobuf pyarrow pyparsing python-dateutil pyyaml requests scikit-learn
scipy six threadpoolctl tqdm typing-extensions urllib3 werkzeug yarl zipp"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# hydra-core pins antlr4-python3-runtime 4.9.*, which PyPI has only as a source archive: build it here.
"$PY" -m pip wheel -q --no-deps -w "$tmp" antlr4-python3-runtime==4.9.3
"$PY" -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any --find-links "$tmp" -d "$tmp" \
  "optuna==$(version optuna)" "mlflow==$(version mlflow)" "hydra-core==$(version hydra-core)" "cmaes==$(version cmaes)"

rm -rf "$DEST" && mkdir -p "$DEST"
for wheel in "$tmp"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')  # wheel file names spell "scikit_learn"
  case " $(echo $PRESENT) " in *" $name "*) ;; *) cp "$wheel" "$DEST/" ;; esac
done
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST (ignored by git; carry it to the GPU machine)"
