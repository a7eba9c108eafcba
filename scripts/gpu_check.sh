#!/usr/bin/env bash
# GPU check: one command, one JSON report.
#
#   bash scripts/gpu_check.sh [--device cuda|cuda:N|cpu] [--small] [--out DIR] [--budget SECONDS]
#
# Runs, on the device: the device-parametrised tests (torch backend vs ONNX Runtime, safetensors
# round trip, import graph), `genret bench search --device D`, `genret bench retrieve` (the
# in-process Retriever: max throughput and open-loop p50/p99 at 2,000 requests/s) at 1M items (L=3)
# and 10M items (L=4), and the HTTP service itself under open-loop load at 1M items
# (scripts/gpu_http.py: 2,000 / 5,000 / 10,000 requests/s, then 10 deltas under load), and SASRec
# training on the CPU and the device (scripts/gpu_train.py, seconds per epoch). Steps, limits and
# the report layout: scripts/gpu_check.py. The report is
# DIR/gpu_check.json (default runs/gpu_check/), rewritten after every step; the whole check stays
# within --budget (default 470 s; 540 s with --small, room for a busy CPU). `--device cpu --small`
# is the CPU dry run that `make test` runs (tests/unit/test_gpu_check.py).
#
# The project goes onto the machine through PYTHONPATH: nothing is installed, the machine's own
# torch is used. The CUDA machines have torch, numpy, onnx, onnxscript, onnxruntime (CPU build),
# safetensors, pytest and httpx; the HTTP step also needs the service's web stack (FastAPI,
# pydantic, uvicorn, the Redis client, ...): those are listed in scripts/gpu_wheels.txt, and
# `make wheels` fetches them (cp312 manylinux / pure-Python wheels into the git-ignored .whl/,
# ~10 MiB of the 64 MiB a check may carry; tests/unit/test_gpu_wheels.py). Carry .whl with the
# check; this script installs them with `pip install --no-index --no-deps --target` and puts
# them on PYTHONPATH. Without them every step but `http` still runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

if [[ -n "${PYTHON:-}" ]]; then
  py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python  # the dev host
else
  py=$(command -v python3 || command -v python)  # the CUDA machine's own interpreter and torch
fi

site=""
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  site=$(mktemp -d /tmp/genret-site.XXXXXX)
  echo "gpu_check: installing ${#wheels[@]} wheel(s) from .whl/ into $site"
  "$py" -m pip install --quiet --no-index --no-deps --target "$site" "${wheels[@]}"
fi

export PYTHONPATH="${site:+$site:}$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
exec "$py" scripts/gpu_check.py "$@"
