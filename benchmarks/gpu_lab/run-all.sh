#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-02 09:37 lease (one H200): the one-GPU tests on the tree as it stands (the
# router's ledger and the CPU dtype rule changed since their last whole run, and X-LoRA
# parity eager and non-granular against peft's one-pass scoring never ran on a GPU); the
# ISQ tests are left out (isq/ unchanged since they passed on 12-01 04:27; their toolkit
# wheelhouse is two more staging calls). Then benchmark a with every run on fresh prompts
# and two runs per concurrency, for the c=64 / c=128 ratios without the prefix-cache
# confound of the earlier sweeps (0.916x and 1.001x at c=128 so far).
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
mkdir -p $R/tests $R/stack; p gpu-tests
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 580 -k "not isq" > $R/tests/summary 2>&1
p "gpu-tests done: $(tail -1 $R/tests/gpu-tests.log)"
ray stop --force > /dev/null 2>&1; pkill -f "vllm.entrypoints" ; sleep 3
timeout 900 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare,stack-tput \
  --concurrency 1,64,128 --repeats 2 --out $R/stack > $R/stack/log 2>&1
p "stack rc=$?"
p "ALL DONE"
