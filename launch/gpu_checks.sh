#!/usr/bin/env bash
# What the CPU cannot check, on one GPU, in two parts of at most ~9 minutes each (a lent machine
# runs one command for at most 10 minutes; 15 minutes of device time in all, so PART=1 first):
#   PART=1 (default, about 9 min at most): the CUDA upsampling test (the ResNet generator's
#          upsample2x equals F.interpolate in values and gradients), then
#          `SET=first tools/gpu_benchmark.sh`: the upsampling micro-benchmark, celeba128 as bf16,
#          bf16+interpolate (the old upsampling) and bf16+channels_last+cudnn_benchmark, cifar10 as
#          fp32 and bf16+compile (the issue-5 targets first).
#   PART=2 (about 4 min at most): the slow CUDA tests, SyncBatchNorm joint batch (two ranks sharing
#          the GPU over gloo equal one process on the joint batch) and the one-GPU DeepSpeed ZeRO-2
#          smoke run (fp32 equals plain training; bf16 trains, checkpoints, evaluates).
# Each benchmark row also has device_reads_per_iter (0 for the engine since issue 28) and
# pipelined_step_ms (steps back to back, one sync at the end), and under compile the engine
# compiles each level's terms (bidvl.engine.Trainer.level_terms).
# Further runs: SET=eager or SET=compile tools/gpu_benchmark.sh (about 8 min each).
#
#   OUT=gpu_out launch/gpu_checks.sh     # then: $OUT/gpu_tests_part1.log, $OUT/benchmarks.jsonl
#   PART=2 OUT=gpu_out launch/gpu_checks.sh
#
# Environment: PART [1], OUT [./gpu_out], PYTHON [.venv/bin/python if present, else python3];
# the benchmark's variables (STEPS, WARMUP, PROFILE, PEAK_TFLOPS) pass through. Needs
# `pip install -e '.[test,deepspeed]'`. On 2026-11-27 (one H100, freshly started) the two slow
# tests did not finish within 150 s: each `accelerate launch` and each worker is a fresh Python
# process (~12 s there), and the tests start nine of them.
set -uo pipefail

OUT=$(realpath -m "${OUT:-./gpu_out}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PART=${PART:-1}
export PYTHON OUT
mkdir -p "$OUT"

tests() {  # limit, test ids...
    local limit=$1 log="$OUT/gpu_tests_part$PART.log"
    shift
    echo "$(date -u '+%T') CUDA-only tests (limit $limit s): $*" >&2
    timeout -k 5 "$limit" "$PYTHON" -m pytest -q -s -p no:cacheprovider -rs "$@" > "$log" 2>&1
    echo "  exit status $? ($(tail -n 1 "$log"))" >&2
}

case $PART in
    1)
        tests 45 "tests/test_models.py::test_upsample_on_cuda_equals_interpolate"
        SET=first tools/gpu_benchmark.sh
        ;;
    2)
        tests 240 \
            "tests/test_scale.py::test_sync_batchnorm_two_processes_equal_one_process_on_the_joint_batch" \
            "tests/test_deepspeed.py::test_zero2_on_one_gpu_matches_plain_training_and_trains_in_bf16"
        ;;
    *) echo "PART=$PART: expected 1 or 2" >&2; exit 2 ;;
esac
