#!/usr/bin/env bash
# The clip-b16 train step on one GPU (issue 11, item 6): images/s and MFU for each
# precision and attention setting worth comparing, one process per setting so that each
# starts with the whole device (about 1.5-3 minutes each on an H200, most of it
# compiling; BUDGET seconds in all, 480 by default, skips what would not fit).
# The settings run most telling first, so that a short device lease still compares
# cuDNN's fused attention with XLA's; ALL=1 adds the CPU's fast setting for reference.
# Needs jax with its CUDA plugin and clip_jax importable (installed, or
# PYTHONPATH=core/src); TensorFlow is not needed.
#
#   bash bench/gpu_clip_b16.sh [batch]        # default 256; figures also in $OUT_DIR/*.txt
#
# Each setting also traces 3 steps (jax.profiler) into $OUT_DIR/trace-*: the summary of
# where the device's time went is printed, and `python bench/profile_summary.py DIR`
# reads a trace again on any machine (set OUT_DIR=$OUT on the device machine to keep them).
set -u
batch=${1:-256}
out_dir=${OUT_DIR:-/tmp/gpu_clip_b16}
mkdir -p "$out_dir"
bf16="model.vision.dtype=bfloat16 model.text.dtype=bfloat16"
budget=${BUDGET:-480} # seconds for all settings: a device lease is short
start=$SECONDS
run() {
  local name=$1 size=$2
  shift 2
  if ((SECONDS - start + 150 > budget)); then
    echo "== $name (batch $size): skipped, under 150 s of BUDGET=$budget left"
    return
  fi
  echo "== $name (batch $size)"
  # shellcheck disable=SC2086  # the settings are words
  timeout "${LIMIT:-300}" python3 bench/train_throughput.py model.preset=clip-b16 \
    "train.batch_size=$size" "$@" --no-run --steps 5 --profile "$out_dir/trace-$name-$size" 2>&1 |
    tee "$out_dir/$name-$size.txt" |
    grep -E "device:|train step|model FLOPs|peak|profile|^  |Error|error" || echo "failed: $name"
}
cudnn="model.vision.attention=cudnn model.text.attention=cudnn"
# shellcheck disable=SC2086
run bf16-cudnn "$batch" $bf16 $cudnn
# shellcheck disable=SC2086
run bf16 "$batch" $bf16
# shellcheck disable=SC2086
run bf16-cudnn "$((batch * 2))" $bf16 $cudnn
if [ "${ALL:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  run bf16 "$((batch * 2))" $bf16
  run f32-matmul-bf16 "$batch" model.vision.matmul_dtype=bfloat16 model.text.matmul_dtype=bfloat16
fi
