#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-02 03:35 lease (one H200): the X-LoRA parity tests as the suite runs them
# (peft scoring vLLM's tokens in one forward pass since 12-01: verified on CPU, not yet on
# a GPU: the 12-01 21:48 and 22:09 leases were lost before they reported), then benchmark
# a again (bare vLLM against the stack in high-throughput mode, the report's order of
# concurrencies), for a third side-by-side c=128 figure (0.916x and 1.001x so far).
# (That lease: the first -k matched no test name; the machine was lost during the stack's
# start, and its successor during the parity tests' app start; see ../results/gpu_tests.)
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
mkdir -p $R/tests $R/stack; p parity-tests
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 560 -k matches_peft > $R/tests/summary 2>&1
p "parity-tests done: $(tail -1 $R/tests/gpu-tests.log)"
timeout 900 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare,stack-tput \
  --concurrency 1,16,64,128 --out $R/stack > $R/stack/log 2>&1
p "stack rc=$?"
p "ALL DONE"
