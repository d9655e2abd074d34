#!/usr/bin/env bash
# The fidelity tables' runs still missing (issue: recipes at published quality, scaling grids) on one GPU machine,
# at once, for BUDGET_S seconds (default 500); whatever finished comes back in $OUT/results.tgz (each run's summary,
# sittings, command, log and newest trainer_state, each benchmark's log; no weights), to be tabled with
# `scaling.py ... --table_only`.
#
# The runs start in sessions of their own, so they outlive the call that launched them (the machine ends a call's
# own processes when it returns): a next call within the machine's warm time, `LAUNCH=0 BUDGET_S=... bash
# benchmarks/gpu_fidelity.sh`, launches nothing, waits for them and collects again, so no run restarts an epoch.
#
# Measured on an H200 (16 host cores): launched together, 24 runs needed more than the GPU's 140 GB (three processes
# held 55, 28 and 28 GB: not recorded which, likely by the sizes the Multi30k runs of 2,048 and 1,024 sentences a
# micro-batch; summaries now give each run's peak_gpu_memory_gib) and 16 of them failed for memory; 11 ResNet-20 runs
# alone made at most 9 of their 30 epochs in 250 s. Hence at most CIFAR10_JOBS (default 4) grid runs at once, and ONLY
# (a regular expression over the benchmark names: cifar10_resnet18, ptb, cifar10, cifar10_adversarial,
# cifar10_extrap_r1.0, gpu_tests) to run a part.
#
# Prepare once, in the repo root (the machine sees only the checkout, and its transformers predates our range):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/data && cp -r ../shared/data/{ptb,cifar10-jpeg} .gpu/data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .gpu/whl transformers==5.24.0 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#       pytorch_optimizer==4.1.0
# then run it with `.gpu` carried: `bash benchmarks/gpu_fidelity.sh`. SMOKE=1 DEVICE=cpu checks every command here
# on a few examples (a CPU run of the same commands, one after another, with data limits appended); a finished run
# is skipped when the script runs again (scaling.py's resume).
set -uo pipefail
out=${OUT:-benchmarks/results/gpu_fidelity}
results=${RESULTS:-benchmarks/results}
device=${DEVICE:-cuda}
budget=${BUDGET_S:-500}
logs=$results/logs
mkdir -p "$out" "$logs"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_LARGEBATCH_DATA=${HF_LARGEBATCH_DATA:-.gpu/data} \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less memory held unused by each of the runs sharing the GPU
if [ "$device" = cuda ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl \
        && export PYTHONPATH=/tmp/site:.
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/machine.txt" 2>&1

common=(--device "$device" --threads 1)
limits() {  # SMOKE: a few examples of each task, one epoch
    [ -n "${SMOKE:-}" ] && echo "--epochs 1 --max_train_samples $1 --max_eval_samples $2 ${3:-}"
}
at_once() {  # runs at once within one benchmark (SMOKE: one, the CPU's memory holds no more)
    if [ -n "${SMOKE:-}" ]; then echo 1; else echo "$1"; fi
}
start=$SECONDS
pids=$results/pids  # the runs launched, each in its own session: they outlive the call that launched them (the
# machine kills a call's own processes when it returns), so the next call (LAUNCH=0) waits for them and collects
launch() {  # name, command...: its output to $logs/name.log (SMOKE: in the foreground, one after another);
    local name=$1; shift  # ONLY (a regular expression) launches only the benchmarks it matches
    [[ "${LAUNCH:-1}" = 0 || ( -n "${ONLY:-}" && ! "$name" =~ $ONLY ) ]] && return
    if [ -n "${SMOKE:-}" ]; then "$@" > "$logs/$name.log" 2>&1
    else setsid "$@" > "$logs/$name.log" 2>&1 < /dev/null & echo $! >> "$pids"; fi
}
running() { local n=0 pid; for pid in $(cat "$pids" 2>/dev/null); do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done
    echo $n; }
# The bases of the ResNet-20, PTB and Multi30k grids ran on the CPU (their results.json joins the tables through
# --add_results); ConAdv's radius is 2/255 of a pixel (0.008), a perturbation for generalisation, not robustness.
# The long poles first.
launch cifar10_resnet18 python3 benchmarks/scaling.py --task cifar10_resnet18 --multiples 1 "${common[@]}" \
    --out "$results/cifar10_resnet18" $(limits 4096 256)
# (PTB's 16x AdaScale ran on the CPU: benchmarks/reports/ptb_grid)
launch ptb python3 benchmarks/scaling.py --task ptb --multiples 64 --methods adascale "${common[@]}" \
    --jobs "$(at_once 1)" --out "$results/lstm" $(limits 2000 200)
# (the grid's linear, LEGW and AutoWU + LAMB runs ran on the CPU: benchmarks/reports/cifar10_grid)
launch cifar10 python3 benchmarks/scaling.py --task cifar10 --epochs 30 --multiples 16 32 \
    --methods adascale --runs "16x adascale" "32x adascale" "${common[@]}" \
    --jobs "$(at_once "${CIFAR10_JOBS:-4}")" --out "$results/cifar10" $(limits 4096 256)
# (Multi30k's grid is complete: 8x linear and 16x LEGW ran on the CPU, benchmarks/reports/multi30k_grid)
launch cifar10_adversarial python3 benchmarks/adversarial.py --task cifar10 --epochs 30 --multiple 16 \
    --method linear --attack pixel_epsilon=0.008 "${common[@]}" --jobs "$(at_once 3)" \
    --out "$results/cifar10_adversarial" $(limits 4096 256)
for ratio in 1.0; do  # (ratio 0.1 ran on the CPU: benchmarks/reports/cifar10_extrap_r0.1)
    launch "cifar10_extrap_r$ratio" python3 benchmarks/scaling.py --task cifar10 --epochs 30 --multiples 16 \
        --methods linear --runs "16x linear" "${common[@]}" --out "$results/cifar10_extrap_r$ratio" \
        --extrapolation fresh --extrapolation_ratio "$ratio" $(limits 4096 256)
done
# the CUDA-marked tests beside them (fp16 GradScaler statistics, ConAdv's side stream)
[ "$device" = cuda ] && launch gpu_tests timeout 200 python3 -m pytest -m gpu -q -rs -p no:cacheprovider \
    tests/test_conadv.py tests/test_stats.py

while [ "$(running)" -gt 0 ] && [ $((SECONDS - start)) -lt "$budget" ]; do sleep 5; done
echo "stopped after $((SECONDS - start)) s; still running: $(running)" | tee -a "$out/machine.txt"
nvidia-smi >> "$out/machine.txt" 2>&1
cp "$out/machine.txt" "$logs/"
grep -h -E "^\[.*\] eval_|passed|failed|Error" "$logs"/*.log  # each finished run's line, the tests' outcome
# what each run left: no weights, only the record (a checkpoint's trainer_state holds its evaluations so far)
(cd "$results" && find . \( -name summary.json -o -name sittings.json -o -name command.json -o -name log.txt \
    -o -name trainer_state.json -o -name results.json -o -name table.md -o -name '*.png' -o -name '*.log' \
    -o -name machine.txt \) -print0 \
    | tar --null -czf - -T - ) > "$out/results.tgz"
ls -la "$out"
