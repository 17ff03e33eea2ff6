#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-02 afternoon lease (one H200): first the X-LoRA parity tests under CUDA
# graphs as the suite runs them, beside the app (granular failed there at 09:46 without a
# traceback; its stderr is now kept, with a progress line per phase); then the W4A16
# kernels at batch 1 side by side (Marlin in bf16 and fp16, ExLlama, Triton) against bf16
# and fp16 bases, the 1.8x target's open question (Marlin bf16 1.49-1.55x so far).
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
mkdir -p $R/tests $R/decode; p parity-tests
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 720 -k "matches_peft and cuda" > $R/tests/summary 2>&1
p "parity tests done: $(tail -1 $R/tests/gpu-tests.log)"
ray stop --force > /dev/null 2>&1; sleep 3
timeout 900 python3 -m benchmarks.gpu_decode --rows quant --out $R/decode \
  --only "8B bf16,8B W4A16 Marlin (bf16),8B W4A16 Marlin (fp16),8B fp16,8B W4A16 ExLlama (fp16),8B W4A16 Triton (bf16)" \
  > $R/decode/log 2>&1
p "decode rc=$?"
p "ALL DONE"
