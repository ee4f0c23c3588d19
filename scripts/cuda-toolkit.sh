#!/usr/bin/env bash
# Installs the pinned CUDA 13 toolkit (nvcc, headers, nvvm, cudart) from its Python wheels into
# .cache/cuda (once; later runs only print), then prints the environment that compiles candle's
# CUDA backend, in a form the shell evaluates:
#
#   eval "$(scripts/cuda-toolkit.sh)"
#
# Why wheels: no machine here has a system toolkit, and PyPI's CUDA 12 wheels carry no nvcc; the
# CUDA 13 ones do (site-packages/nvidia/cu13/{bin,include,lib,nvvm}, about 105 MB). 13.0.2 is
# pinned because cudarc 0.19 (candle 0.11's) knows CUDA 13.0 to 13.4, and the lent GPU machines
# run driver 580, which is CUDA 13.0. No CUDA library is needed to compile: cudarc loads them at
# run time, and scripts/build-gpu.sh links against stubs.
#
# Environment: CUDA_TOOLKIT_DIR (default .cache/cuda), CUDA_COMPUTE_CAP (default 90: H100/H200,
# which candle-kernels compiles as sm_90a).
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0.2
dir=${CUDA_TOOLKIT_DIR:-$PWD/.cache/cuda}
stamp=$dir/installed-$version
if [[ ! -f $stamp ]]; then
    echo "installing cuda-toolkit $version into $dir (about 105 MB) ..." >&2
    rm -rf "$dir"
    python3 -m venv "$dir" >&2
    "$dir/bin/pip" install --quiet --disable-pip-version-check \
        "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl]==$version" >&2
    touch "$stamp"
fi
home=$(echo "$dir"/lib/python3*/site-packages/nvidia/cu13)
if [[ ! -x $home/bin/nvcc ]]; then
    echo "cuda-toolkit.sh: no nvcc at $home/bin/nvcc; remove $dir and run again" >&2
    exit 1
fi
cat <<EOF
export CUDA_HOME='$home'
export CUDA_PATH='$home'
export PATH='$home/bin':"\$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=2
EOF
