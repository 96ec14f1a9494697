#!/usr/bin/env bash
# Fills, on a machine with pip access, the two folders that benchmarks/gpu_check.sh carries to a device machine:
#
#   WHEELS (default .whl)       wheels of what the project needs and the device image lacks: datasets and its two
#                               missing dependencies (the CLI check), optimum (the optimum-cli plugin), and
#                               setuptools >= 77 (the editable install's build backend); CPython 3.12, x86_64
#   DATA (default .gpu-data)    Fashion-MNIST's test files (4.4 MB), for top-1 and the CLI check
#
# Both folders are git-ignored; name them in the device call's carry:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-data"], timeout_s=440)
#
#   bash benchmarks/gpu_prep.sh [WHEELS] [DATA]
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
DATA=${2:-.gpu-data}
PY=${PYTHON:-python3}
# pinned to what the test suite runs with here; each is pure Python or built for CPython 3.12 on manylinux x86_64
PACKAGES=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 optimum==2.3.0 setuptools==84.2.1)
mkdir -p "$WHEELS" "$DATA/fashion-mnist"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PACKAGES[@]}"
SRC=${OPTIMUM_VIM_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
for f in t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$SRC/$f" ] || { echo "gpu_prep.sh: error: $SRC/$f not found (apt-get install dataset-fashion-mnist, or set OPTIMUM_VIM_FASHION_MNIST_DIR)" >&2; exit 2; }
    cp "$SRC/$f" "$DATA/fashion-mnist/"
done
"$PY" benchmarks/gpu_check_helpers.py wheels "$WHEELS"/*.whl
du -sh "$WHEELS" "$DATA"
