#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# Next lease (one H200): where each 8B scheme stops paying as concurrency grows, one run:
# bf16, FP8, W4A16 on vLLM's default kernel (Machete on Hopper), Humming and Marlin, at
# batch 1-256, 3 runs each (12-02 14:38: Humming 1.23x bf16 at batch 64, Marlin 0.94x,
# Machete 1.03x and FP8 1.35x on 11-30, never side by side). Then the one-GPU tests but
# ISQ and the parity ones (all passed 12-02 14:45-14:58), as long as the lease lasts.
cd /tmp/work
START=$(date +%s)
R=/tmp/results
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
# vLLM loads a GPTQ checkpoint through compressed-tensors, which /tmp/site lacks (as in
# isq-env.sh; here its wheels come in x0, without the ISQ wheelhouse).
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-isq \
  /tmp/extra/compressed_tensors-0.17.0-py3-none-any.whl /tmp/extra/loguru-0.7.3-py3-none-any.whl
export PYTHONPATH=$PYTHONPATH:/tmp/site-isq
mkdir -p $R/tests $R/decode; p decode
timeout 1080 python3 -m benchmarks.gpu_decode --rows quant --out $R/decode \
  --batches 1,8,32,64,128,256 --repeats 3 --only "8B bf16,8B FP8 (W8A8, quantized at load),\
8B W4A16 (GPTQ, random 4-bit weights),8B W4A16 Humming (bf16),8B W4A16 Marlin (bf16)" \
  > $R/decode/log 2>&1
p "decode rc=$?"
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 720 -k "not isq and not matches_peft" \
  > $R/tests/summary 2>&1
p "gpu-tests done: $(tail -1 $R/tests/gpu-tests.log)"
p "ALL DONE"
