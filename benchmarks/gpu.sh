#!/bin/sh
# The benchmark and the CUDA path tests on a machine with an NVIDIA GPU, in under 5 minutes.
# Run from the repository root with cliplens installed (pip install -e '.[dev]'):
#   sh benchmarks/gpu.sh            # writes docs/PERFORMANCE-GPU.md
set -eu
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# a failing test must not cost the run its benchmark (the GPU time is scarce): both run, then the
# script fails if the tests did
tests=0
"$PYTHON" -m pytest -q tests/gpu || tests=$?
"$PYTHON" benchmarks/pipeline.py --device cuda --photos 60 --images 50 --concurrency 30 \
    --variants original,cliplens-default,cliplens-float32,cliplens-gpu-decode,cliplens-free,cliplens-cache,cliplens-cache-off \
    --output "${OUTPUT:-docs/PERFORMANCE-GPU.md}"
exit "$tests"
