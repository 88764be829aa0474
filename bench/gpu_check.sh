#!/usr/bin/env bash
# The checks that need CUDA, in one run of at most 8 minutes: serving on GPUs against one process on the CPU.
#
#   bash bench/gpu_check.sh            # from the repository root or anywhere; PYTHON=... picks the interpreter
#
# It installs nothing: the interpreter needs a CUDA build of torch and the rest of requirements-dev.txt
# (pip install -r requirements-dev.txt after installing your own torch). It runs this checkout's source.
# - one process on the GPU (--device-map auto) and the taps' no-synchronisation test, on any GPU;
# - a sharded server with a rank on each GPU over NCCL (--ranks 2 and 3 where there are that many GPUs,
#   torchrun's single rank where there is one), against one process, then a hung rank ending it in time.
# Tests that need more GPUs than there are say so as skipped (-rs).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L || true
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA devices:", torch.cuda.device_count())' || exit 1
"$python" -c 'import fastapi, uvicorn, httpx, transformers, accelerate, safetensors' || {
    echo "gpu_check: install requirements-dev.txt (with a CUDA build of torch) first" >&2
    exit 1
}
timeout --kill-after 10 470 "$python" -m pytest -q -rs -p no:cacheprovider \
    tests/test_distributed.py tests/test_core_hotpath.py \
    -k "gpu or gpus or device_map or rank_device or synchronise"
code=$?
[ "$code" -eq 124 ] && echo "gpu_check: stopped after its 8 minutes" >&2
exit "$code"
