#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# Next lease (one H200): Humming, the one W4A16 kernel of vLLM 0.26 not yet measured
# (12-02 13:23: ExLlama 1.58x bf16 at batch 1, Marlin 1.48x, Triton 0.18x; target 1.8x),
# beside bf16 and Marlin in the same run; then the one-GPU tests on the tree (ISQ left out:
# isq/ unchanged since they passed on 12-01; the parity tests passed beside the app at
# 12-02 13:12).
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
timeout 900 python3 -m benchmarks.gpu_decode --rows quant --out $R/decode \
  --only "8B bf16,8B W4A16 Humming (bf16),8B W4A16 Marlin (bf16)" > $R/decode/log 2>&1
p "decode rc=$?"
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 720 -k "not isq" > $R/tests/summary 2>&1
p "gpu-tests done: $(tail -1 $R/tests/gpu-tests.log)"
p "ALL DONE"
