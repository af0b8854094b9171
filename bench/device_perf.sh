#!/usr/bin/env bash
# The performance issue's figures in one device call on a 2-GPU machine (about 9 minutes):
# GPU 0 times the DiT (bench.dit_step: eager, fused kernels off, sliding-tile attention,
# compiled, kernel breakdown) while GPU 1 runs the VAE, quality (STA / step cache against
# dense), end-to-end and 14B-shape benchmarks. Results and logs go to $OUT (or ./bench-out).
# Needs the wheels of bench/README.md installed on PYTHONPATH first.
set -u
OUT=${OUT:-bench-out}
B=${B:-/tmp/rw}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# The fused kernels first: if they fail here, every figure below is taken without them.
if ! CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider \
    tests/test_fused_ops.py >"$OUT/gpu0.log" 2>&1; then
  echo "FUSED KERNEL TESTS FAILED: benchmarks run with FASTVIDEO_FUSED_KERNELS=0" | tee -a "$OUT/gpu0.log"
  export FASTVIDEO_FUSED_KERNELS=0
fi
tail -3 "$OUT/gpu0.log"

(
  export CUDA_VISIBLE_DEVICES=0
  timeout 450 python3 -m bench.dit_step --shape 1.3b --ablation --sta 3,3,3 --compile \
    --profile --json "$OUT/dit_1.3b.json" >>"$OUT/gpu0.log" 2>&1
  echo "dit_step 1.3b exit $?" >>"$OUT/gpu0.log"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  {
    timeout 60 python3 -m fastvideo.testing.random_wan "$B" --cached --size 1.3b | grep -E 'wan2|write_s'
    timeout 90 python3 -m bench.vae --repeats 2 --json "$OUT/vae.json"
    timeout 240 python3 -m bench.quality --build-dir "$B" --steps 20 --prompts 2 \
      --configs dense,sta:3.3.3,cache:0.08,cache:0.15 --json "$OUT/quality.json"
    timeout 90 python3 -m bench.e2e --build-dir "$B" --steps 10 --json "$OUT/e2e.json"
    timeout 120 python3 -m bench.dit_step --shape 14b --no-cfg-step --repeats 3 --warmup 1 \
      --json "$OUT/dit_14b.json"
  } >"$OUT/gpu1.log" 2>&1
) &
wait
grep -A14 "^| system" "$OUT/gpu0.log"
grep -E "^\| |kernels|exit" "$OUT/gpu0.log" | grep -v -- "---" | tail -12
grep -E "^\| " "$OUT/gpu1.log"
