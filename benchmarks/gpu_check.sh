#!/usr/bin/env bash
# The checks only a GPU can make, in one run of under 10 minutes; results under $OUT (default
# benchmarks/results/gpu_check): the GPU's name, the CUDA-marked tests (fp16 GradScaler statistics, ConAdv's side
# stream against its attacks in line) and ConAdv's step time on the GPU against the clean and the sequential step.
#
# It needs the data it reads inside the checkout (a machine lent for the run sees only the checkout) and, where the
# machine's transformers is older than pyproject's range, wheels of it. Prepare once, in the repo root:
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/data && cp -r ../shared/data/fashion-mnist .gpu/data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl \
#       transformers==5.24.0 pytorch-optimizer
# then run it with `.gpu` carried: `bash benchmarks/gpu_check.sh`.
set -uo pipefail
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_LARGEBATCH_DATA=${HF_LARGEBATCH_DATA:-.gpu/data}
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"

# 1. the tests marked gpu (skipped on CPU)
timeout 240 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.txt"

# 2. ConAdv on the GPU, 4 micro-batches a step: its side-stream attacks against the same attacks in line, the
#    sequential adversarial step and the clean step (mirrored repeats in one process; medians)
timeout 300 python3 benchmarks/overhead.py --variants plain sequential_adv conadv_in_line conadv \
    --data fashion_mnist --batch 128 --grad-accum 4 --same-process --steps 30 --warmup 5 --repeats 5 \
    --out "$out/overhead_conadv" 2>&1 | tail -40 | tee "$out/overhead_conadv.txt"
