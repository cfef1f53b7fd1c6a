#!/usr/bin/env bash
# One lent-GPU session in one command: the kernel tests on the compiled kernels, then the kernel
# benchmarks against their peers (cuDNN, flash-linear-attention, NATTEN's Flex backend).
#
# On the GPU machine, from the project's root, with ../shared/gpu/prepare_wheels.sh's `.gpu-wheels`
# carried along:
#   bash benchmarks/run_gpu.sh            # results under $OUT (or /tmp/attnjax_gpu)
#   STEPS="linear_fwd na" bash benchmarks/run_gpu.sh   # a subset of the steps below
# Every step has its own time limit (seconds; override with the variables below) so that one slow
# step cannot eat the others' time, and every benchmark writes its table after each case, so a step
# cut short keeps what it measured. Everything ends up in `gpu_results.tgz` plus the whole log.
set -uo pipefail
out=${OUT:-/tmp/attnjax_gpu}
res=/tmp/attnjax_gpu_results
mkdir -p "$out" "$res"
exec > >(tee "$out/log.txt") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_FLAGS= JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several pytest workers share the one GPU

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, jaxlib, flax, torch, triton; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, 'triton', triton.__version__, jax.devices())"
python3 -c "import fla, natten; print('fla', fla.__version__, 'natten', natten.__version__)"

step() {  # step NAME LIMIT CMD...: runs CMD under a time limit and reports how it ended
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s"
}

tests() {  # the kernel tests on the compiled kernels; IEEE float32 dots so float32 tolerances hold
  step kernel_tests "${KERNEL_TESTS_S:-170}" env ATTNJAX_KERNEL_TESTS_ON_GPU=1 \
    JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -n 8 -p no:cacheprovider \
    --junitxml="$res/kernel_tests_gpu.xml" tests/kernels -rfE
}
# Chunked linear attention (no decay, scalar gate, GLA, gated delta) vs fla and cuDNN softmax. fla
# autotunes every kernel on first use (minutes for its backward kernels), so forward and
# forward+backward run as separate steps.
linear_fwd() {
  step linear_fwd "${LINEAR_FWD_S:-150}" python3 -m experiments.bench_linear_kernel --modes=fwd \
    --seq_lens="${LINEAR_T:-4096,16384}" --repeats=10 --warmup=2 --out="$res/linear_kernel_fwd_gpu"
}
linear_bwd() {
  local impls=${LINEAR_BWD_IMPLS:-pallas_linear,pallas_scalar,pallas_gla,pallas_delta,cudnn_softmax,fla_chunk_linear_attn,fla_chunk_simple_gla,fla_chunk_gla,fla_chunk_gated_delta_rule}
  step linear_bwd "${LINEAR_BWD_S:-160}" python3 -m experiments.bench_linear_kernel --modes=fwd+bwd \
    --seq_lens="${LINEAR_BWD_T:-4096}" --impls="$impls" --repeats=10 --warmup=2 \
    --out="$res/linear_kernel_bwd_gpu"
}
flash() {  # block-sparse flash: dense (vs cuDNN) and random-layout sparse suites
  step flash_dense_sparse "${FLASH_S:-120}" python3 -m experiments.bench_flash \
    --suites=dense,sparse --batch_sizes=2 --seq_lens=4096,16384 --densities=0.5,0.25,0.1 \
    --repeats=10 --out="$res/flash_gpu"
}
na() {  # neighborhood attention: NATTEN's published cases vs cuDNN dense and NATTEN Flex
  step flash_na "${NA_S:-100}" python3 -m experiments.bench_flash --suites=na --repeats=5 \
    --out="$res/flash_na_gpu"
}

for s in ${STEPS:-tests linear_fwd linear_bwd flash na}; do "$s"; done

tar -czf "$out/gpu_results.tgz" -C "$res" .
ls -la "$res"
for f in "$res"/*.md; do echo "----- $f"; cat "$f"; done
