#!/usr/bin/env bash
# Engine vs plain loop on one GPU (H100 sized: at most ~14 minutes in all, SET below): configs/cifar10.yaml
# (DCGAN, 32 px, batch 100) and configs/celeba128.yaml (ResNet, 128 px, batch 36) on random
# tensors, fp32 vs bf16 vs bf16+channels_last+cudnn_benchmark vs bf16+compile (engine:
# train.compile=true; plain loop: torch.compile of its three nets; see tools/benchmark.py), each
# with the top operators of PROFILE steps (torch.profiler: where the time goes). celeba128 runs
# bf16+interpolate instead of fp32 (the old upsampling; see below).
#
#   OUT=gpu_out tools/gpu_benchmark.sh      # then: cat gpu_out/benchmarks.jsonl
#
# First (about 20 s; not with SET=compile) tools/benchmark_upsample.py times the ResNet generator's upsampling, F.interpolate
# vs the slice formulation bidvl.models.resnet.upsample2x uses for NCHW tensors on CUDA: $OUT/upsample.json.
# One JSON object per line in $OUT/benchmarks.jsonl (a run that fails or times out writes a line
# with "error"), stderr of each run in $OUT/logs/, the GPU in $OUT/nvidia-smi.txt. Each run has
# its own `timeout`, so one hang (e.g. in torch.compile) costs only its own slot.
# Environment: SET [all: eager and compile runs], OUT [./gpu_out], PYTHON [.venv/bin/python if present, else python],
# STEPS [20], WARMUP [3], PROFILE [3], PEAK_TFLOPS [989: H100 SXM bf16 dense]; for a smoke test of this script
# without a GPU: DEVICE=cpu BATCH=2 STEPS=1 WARMUP=0 (BATCH overrides the configs' batch sizes).
set -uo pipefail

OUT=$(realpath -m "${OUT:-./gpu_out}")  # relative to where it is started
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
PROFILE=${PROFILE:-3}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DEVICE=${DEVICE:-cuda}
batch=()
if [[ -n ${BATCH:-} ]]; then
    batch=(--batch-size "$BATCH")
fi
mkdir -p "$OUT/logs"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# config, variants, time limit (s), stand-in images for the loader measurement (the configs'
# shards are usually not on a benchmark machine: tools/benchmark.py --stand-in-data). Measured on one H100 (2026-11-27, docs/benchmarks.md): each
# side of each variant runs in a fresh process that needs ~12 s to import and start CUDA, so the
# eager pairs take ~60 s (cifar10) and ~90 s (celeba128) warm and more on a freshly started machine;
# the compile runs add two cold torch.compile each (engine and plain loop) and were cut off at
# 130/150 s there. SET=first (what to learn first on a lent GPU, about 8.5 min at most: the
# upsampling micro-benchmark, celeba128's upsampling A/B, cifar10's bf16+compile against fp32)
# | eager (about 7.5 min) | compile (about 8 min) | all (eager and compile).
fast=bf16+channels_last+cudnn_benchmark
# celeba128: bf16 vs bf16+interpolate is the whole-step effect of the generator's upsampling
# (resnet.upsample2x); the 2026-11-27 H100 figures ran F.interpolate (fp32 328.8, bf16 283.4 ms).
celeba128_eager="configs/celeba128.yaml bf16,bf16+interpolate,$fast  220  1000"
eager=(
    "configs/cifar10.yaml   fp32,bf16,$fast  150  1000"
    "$celeba128_eager"
)
compiled=(
    "configs/cifar10.yaml   bf16+compile  220  0"
    "configs/celeba128.yaml bf16+compile  260  0"
)
first=(
    "$celeba128_eager"
    "configs/cifar10.yaml   fp32,bf16+compile  220  0"
)
upsample=1
case ${SET:-all} in
    first) runs=("${first[@]}") ;;
    eager) runs=("${eager[@]}") ;;
    compile) runs=("${compiled[@]}"); upsample=0 ;;
    all) runs=("${eager[@]}" "${compiled[@]}") ;;
    *) echo "SET=${SET}: expected first, eager, compile or all" >&2; exit 2 ;;
esac

start=$SECONDS
if [[ $upsample == 1 ]]; then
    echo "$(date -u '+%T') tools/benchmark_upsample.py (limit 60s)" >&2
    timeout -k 5 60 "$PYTHON" tools/benchmark_upsample.py --device "$DEVICE" "${batch[@]}" \
        > "$OUT/upsample.json" 2> "$OUT/logs/upsample.log" || echo "  failed: exit status $? (see $OUT/logs/upsample.log)" >&2
fi
for run in "${runs[@]}"; do
    read -r config variants limit images <<< "$run"
    name="$(basename "$config" .yaml)_${variants//[+,]/_}"
    echo "$(date -u '+%T') $config $variants (limit ${limit}s)" >&2
    # A fresh inductor cache per run: a run killed by its limit mid-compile can leave a truncated
    # kernel library behind ("file too short", seen on the development CPU) that breaks later runs.
    cache=$(mktemp -d)
    line=$(TORCHINDUCTOR_CACHE_DIR="$cache" timeout -k 5 "$limit" "$PYTHON" tools/benchmark.py --config "$config" --device "$DEVICE" \
               "${batch[@]}" --variants "$variants" --steps "$STEPS" --warmup "$WARMUP" --profile "$PROFILE" --stand-in-data "$images" --peak-tflops "$PEAK_TFLOPS" \
               2> "$OUT/logs/$name.log")
    status=$?
    rm -rf "$cache"
    if [[ $status -eq 0 && -n $line ]]; then
        echo "$line" >> "$OUT/benchmarks.jsonl"
    else
        reason=$([[ $status -eq 124 || $status -eq 137 ]] && echo "timeout after ${limit}s" || echo "exit status $status")
        printf '{"config": "%s", "variants": "%s", "error": "%s", "log": "logs/%s.log"}\n' \
            "$config" "$variants" "$reason" "$name" >> "$OUT/benchmarks.jsonl"
        echo "  failed: $reason (see $OUT/logs/$name.log)" >&2
    fi
done
echo "$(date -u '+%T') done in $((SECONDS - start)) s: $OUT/benchmarks.jsonl" >&2
