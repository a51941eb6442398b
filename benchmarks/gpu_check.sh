#!/usr/bin/env bash
# The GPU check of saelab's fast path, for one H100/H200 with torch, pytorch-lightning, torchvision
# and tensorboard installed but not hydra-core/omegaconf (their wheels travel in .wheels/, with
# pytest's). From the repository root, with the MNIST mirror in $SAELAB_MIRROR, shared/data,
# ../shared/data or .data/mirror:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# (a) the fast-path tests: CUDA-graph steps train like eager steps (Adam and AdamW, with and
#     without torch.compile), the pipeline on the fast path matches it with graphs off;
# (b) the benchmark: the default multiclass pipeline at batch 128, saelab on the fast path
#     (trainer=gpu) against a plain eager PyTorch loop on the same GPU, side by side.
# Writes env.txt, pytest.log, junit.xml, bench_gpu.log and bench_gpu.json into $OUT; finishes
# within 6 minutes (each part has a time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
start=$SECONDS
wheels=(--no-index --find-links .wheels)

python -m pip install -q "${wheels[@]}" hydra-core omegaconf || exit 1
python -c "import pytest" 2>/dev/null || python -m pip install -q "${wheels[@]}" pytest || exit 1
python -m pip install -q "${wheels[@]}" --no-deps -e . || exit 1

for dir in "${SAELAB_MIRROR:-}" shared/data ../shared/data .data/mirror; do
    if [ -n "$dir" ] && [ -d "$dir/MNIST/raw" ]; then
        SAELAB_MIRROR=$(cd "$dir" && pwd)
        break
    fi
done
if [ ! -d "${SAELAB_MIRROR:-/nonexistent}/MNIST/raw" ]; then
    echo "gpu_check: no MNIST mirror (set SAELAB_MIRROR or carry .data/mirror/MNIST/raw)" \
        | tee "$OUT/env.txt"
    exit 2
fi
export SAELAB_MIRROR
SAELAB_CACHE=$(mktemp -d)
export SAELAB_CACHE

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'lightning', pl.__version__)"
    echo "install: $((SECONDS - start)) s"
} > "$OUT/env.txt" 2>&1

timeout 150 python -m pytest tests/test_fastpath.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1
echo "tests: exit $?, at $((SECONDS - start)) s" >> "$OUT/env.txt"

timeout $((345 - (SECONDS - start))) python benchmarks/bench.py --device cuda --reps 1 \
    --scaling-epochs 0 --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
echo "benchmark: exit $?, at $((SECONDS - start)) s" >> "$OUT/env.txt"
cat "$OUT/env.txt"
tail -n 25 "$OUT/pytest.log" "$OUT/bench_gpu.log"
