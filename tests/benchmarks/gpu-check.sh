#!/usr/bin/env bash
# The GPU checks of flowbench, as one short script for a lent accelerator machine.
# Run it from the project root on that machine (its python3 already has torch with CUDA, numpy, scipy,
# h5py, scikit-learn, tabulate, tqdm, torchdiffeq, matplotlib; nothing can be installed there), e.g.
#     bash tests/benchmarks/gpu-check.sh        (flowbench's copy of ../shared/device/gpu-check.sh, extended)
# It writes logs and JSON under $OUT (default ./gpu-check-out) and prints a summary. Each step has its own
# time limit so that one hang cannot eat the whole lease; steps 1-4 were sized for about 8 minutes, steps 5-6
# (not yet run on a GPU) add at most 5.5 minutes of limits: drop step 2 first if the lease is short.
# Extend it as the project grows (new benchmarks, the stacked trainer); keep it under 10 minutes.
set -u
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$(printf '%-28s' "$name") rc=$rc  $(( $(date +%s) - t0 )) s  | $(tail -n 1 "$OUT/$name.log" | cut -c1-150)"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# 1. The test suite with a GPU visible (the CUDA-only tests run instead of being skipped).
step tests-cuda 240 $PY -m pytest -q -x -ra -k "cuda or gpu or device" tests
# 2. Real training on the GPU: digits, MAF and relgrad, records beside a CPU run of the same seed.
for m in maf relgrad; do
  step "run-$m-cuda" 120 $PY -m flowbench run --model "$m" --device cuda --out "$OUT/runs-cuda" --quiet --max-epochs 30
  step "run-$m-cpu" 120 $PY -m flowbench run --model "$m" --device cpu --out "$OUT/runs-cpu" --quiet --max-epochs 30
done
# 3. Training throughput of MAF (5) on POWER's shape (synthetic data when POWER is not prepared).
step bench-train-power-maf 120 $PY -m flowbench bench train --dataset power --model maf --device cuda --out "$OUT"
# 4. The relative-gradient paper's Figure 1 on the GPU, up to D = 20,000.
step bench-gradients 200 $PY -m flowbench bench gradients --device cuda --dims 64,256,784,2048,4096,8192,20000 \
  --methods relative,ordinary,mlp --out "$OUT"
# 5. Stacked runs (issue 11): R runs as one stack against the same runs one after another (the sequential
#    samples/s is one run's, so the printed ratio is the stack's throughput over one run's on this GPU).
step bench-stack-power-maf-64 120 $PY -m flowbench bench train --dataset power --model maf --device cuda \
  --stack 64 --steps 30 --out "$OUT"
step bench-stack-mnist-relgrad-4 60 $PY -m flowbench bench train --dataset mnist --model relgrad --device cuda \
  --stack 4 --steps 100 --out "$OUT"
# 6. --seeds on the GPU: digits MAF, eight seeds as one stack against one seed (wall time).
step run-maf-seed0-cuda 60 $PY -m flowbench run --model maf --device cuda --out "$OUT/seeds" --quiet --max-epochs 30
step run-maf-seeds0-7-cuda 90 $PY -m flowbench run --model maf --device cuda --seeds 0-7 --out "$OUT/seeds" \
  --quiet --max-epochs 30 --force
echo "outputs in $OUT"
