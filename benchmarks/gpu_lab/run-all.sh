#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# Next lease (one H200): the two levers left on W4A16 at batch 1 (best 1.56-1.58x bf16 of
# 1.8x; 12-02 sweep): torch's own 4-bit kernel (tinygemm) on an 8B step's GEMMs beside
# cuBLAS bf16, outside vLLM (~2 min), then Humming with the LM head in 4 bits too, beside
# bf16 and Humming with a bf16 head, and FP8 for the weights' size once loaded (the report's
# new column; its checkpoint is bf16) (3 runs each, ~8 min with the 4-bit-head checkpoint's
# build). Then the one-GPU tests but ISQ and parity (all passed 12-02), now with
# engine.w4a16_kernel's (a W4A16 checkpoint served on Humming; its first run anywhere).
cd /tmp/work
START=$(date +%s)
R=/tmp/results
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
# vLLM loads a GPTQ checkpoint through compressed-tensors, which /tmp/site lacks (as in
# isq-env.sh; here its wheels come in x0, without the ISQ wheelhouse).
[ -d /tmp/site-isq/compressed_tensors ] ||
  python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-isq \
    /tmp/extra/compressed_tensors-0.17.0-py3-none-any.whl /tmp/extra/loguru-0.7.3-py3-none-any.whl
export PYTHONPATH=$PYTHONPATH:/tmp/site-isq
mkdir -p $R/tests $R/decode $R/int4; p int4-gemm
timeout 300 python3 -m benchmarks.gpu_int4_gemm --out $R/int4 > $R/int4/log 2>&1
p "int4-gemm rc=$?"
timeout 900 python3 -m benchmarks.gpu_decode --rows quant --out $R/decode --repeats 3 \
  --only "8B bf16,8B W4A16 Humming (bf16),8B W4A16 Humming (bf16; 4-bit LM head),8B FP8 (W8A8, quantized at load)" \
  > $R/decode/log 2>&1
p "decode rc=$?"
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 840 -k "not isq and not matches_peft" \
  > $R/tests/summary 2>&1
p "gpu-tests done: $(tail -1 $R/tests/gpu-tests.log)"
p "ALL DONE"
