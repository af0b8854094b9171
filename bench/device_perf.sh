#!/usr/bin/env bash
# The performance issue's figures in one device call on a 2-GPU machine (about 8 minutes).
# GPU 0: bench.dit_step at the 1.3B shape (diffusers and ours eager, ours with the fused
#        kernels off, sliding-tile attention, all compiled, kernel-time breakdown), then the
#        14B shape (eager forwards).
# GPU 1: bench.sta_kernel (FlexAttention kernel options for STA), bench.dit_step's STA rows
#        with the fastest options, bench.quality (step-cache thresholds against dense).
# Results and logs go to $OUT (or ./bench-out). Needs the wheels of bench/README.md on
# PYTHONPATH first. (bench.vae and bench.e2e: see README; they ran in an earlier call.)
set -u
OUT=${OUT:-bench-out}
B=${B:-/tmp/rw}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# The fused kernels must equal the PyTorch chain (fp32) or every figure is taken without them.
if ! CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m pytest -q -p no:cacheprovider \
    tests/test_fused_ops.py -k "not bf16" >"$OUT/gpu0.log" 2>&1; then
  echo "FUSED KERNEL TESTS FAILED: benchmarks run with FASTVIDEO_FUSED_KERNELS=0" | tee -a "$OUT/gpu0.log"
  export FASTVIDEO_FUSED_KERNELS=0
fi
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m pytest -q -p no:cacheprovider \
  tests/test_fused_ops.py -k bf16 2>&1 | tail -3 | tee -a "$OUT/gpu0.log"

(
  export CUDA_VISIBLE_DEVICES=0
  {
    timeout 240 python3 -m bench.dit_step --shape 1.3b --ablation --sta 3,3,3 --compile \
      --profile --json "$OUT/dit_1.3b.json"
    echo "dit_step 1.3b exit $?"
    timeout 230 python3 -m bench.dit_step --shape 14b --no-cfg-step --repeats 3 --warmup 1 \
      --json "$OUT/dit_14b.json"
    echo "dit_step 14b exit $?"
  } >>"$OUT/gpu0.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  {
    timeout 150 python3 -m bench.sta_kernel --json "$OUT/sta_kernel.json"
    best=$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/sta_kernel.json'))['best']))")
    if [ -n "$best" ] && [ "$best" != "null" ]; then export FASTVIDEO_FLEX_KERNEL_OPTIONS="$best"; fi
    echo "FASTVIDEO_FLEX_KERNEL_OPTIONS=${FASTVIDEO_FLEX_KERNEL_OPTIONS:-}"
    timeout 120 python3 -m bench.dit_step --shape 1.3b --sta 3,3,3 --sta-only --compile \
      --json "$OUT/dit_sta_tuned.json"
    unset FASTVIDEO_FLEX_KERNEL_OPTIONS
    timeout 60 python3 -m bench.random_wan "$B" --cached --size 1.3b | grep -E 'wan2|write_s'
    timeout 170 python3 -m bench.quality --build-dir "$B" --steps 20 --prompts 1 \
      --configs dense,cache:0.3,cache:0.6 --json "$OUT/quality_cache.json"
  } >"$OUT/gpu1.log" 2>&1
) &
wait
grep -E "^\| |kernels|exit|BEST|FLEX" "$OUT/gpu0.log" "$OUT/gpu1.log" | grep -v -- "---"
