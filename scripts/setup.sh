#!/usr/bin/env bash
# Sets up optimum-vim on a fresh Linux machine: PyTorch (CPU build 2.13.0 where the local wheel exists), the
# Fashion-MNIST Debian package, and this repository in editable mode. `--dev` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRA=""
[ "${1:-}" = "--dev" ] && EXTRA="[dev]"

# torch first, pinned: a bare `torch` requirement would otherwise pull the newest multi-GB CUDA build
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -z "${OPTIMUM_VIM_FASHION_MNIST_DIR:-}" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

"$PY" -m pip install --quiet --disable-pip-version-check -e ".${EXTRA}"
"$PY" -c "import optimum_vim, torch; print('optimum-vim', optimum_vim.__version__, '| torch', torch.__version__)"
