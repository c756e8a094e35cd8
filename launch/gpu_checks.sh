#!/usr/bin/env bash
# What the CPU cannot check, in one go on one GPU (sized for one H100: about 12 minutes at most):
#   1. the CUDA-only tests: SyncBatchNorm joint batch (two ranks sharing the GPU over gloo equal one
#      process on the joint batch), the one-GPU DeepSpeed ZeRO-2 smoke run (fp32 equals plain
#      training; bf16 trains, checkpoints, evaluates) and the generator's CUDA upsampling (equals
#      F.interpolate in values and gradients);
#   2. launch/gpu_benchmark.sh with SET=eager: the upsampling micro-benchmark, then cifar10 as fp32,
#      bf16, bf16+channels_last+cudnn_benchmark and celeba128 as bf16, bf16+interpolate (the old
#      upsampling), bf16+channels_last+cudnn_benchmark, with each side's top operators. The compile
#      runs take another ~8 minutes: SET=compile launch/gpu_benchmark.sh.
#
#   OUT=gpu_out launch/gpu_checks.sh     # then: $OUT/gpu_tests.log, $OUT/benchmarks.jsonl
#
# Environment: OUT [./gpu_out], PYTHON [.venv/bin/python if present, else python3], SET [eager];
# the benchmark's variables (STEPS, WARMUP, PEAK_TFLOPS) pass through. Needs
# `pip install -e '.[test,deepspeed]'`. On 2026-11-27 (one H100, freshly started) the two tests
# did not finish within 150 s: each `accelerate launch` and each worker is a fresh Python process
# (~12 s there), and the tests start nine of them.
set -uo pipefail

OUT=$(realpath -m "${OUT:-./gpu_out}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export PYTHON OUT SET=${SET:-eager}
mkdir -p "$OUT"

echo "$(date -u '+%T') CUDA-only tests (limit 240 s)" >&2
timeout -k 5 240 "$PYTHON" -m pytest -q -s -p no:cacheprovider -rs \
    "tests/test_scale.py::test_sync_batchnorm_two_processes_equal_one_process_on_the_joint_batch" \
    "tests/test_deepspeed.py::test_zero2_on_one_gpu_matches_plain_training_and_trains_in_bf16" \
    "tests/test_models.py::test_upsample_on_cuda_equals_interpolate" \
    > "$OUT/gpu_tests.log" 2>&1
echo "  exit status $? ($(tail -n 1 "$OUT/gpu_tests.log"))" >&2

launch/gpu_benchmark.sh
