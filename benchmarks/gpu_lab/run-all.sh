#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 15:31 lease (its 14:42 start lost the machine to a client outage after
# the bf16 row; its W4A16 rows failed for want of compressed-tensors) (one H200): where W4A16's batch-1 decode step goes against
# bf16 (benchmarks.gpu_decode_profile: torch profiler, kernels by kind, bandwidth), then
# the one-GPU tests: the per-GPU engine-start lock's first GPU run (base and X-LoRA
# replicas share the card) and X-LoRA parity with peft scoring in one forward pass.
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
mkdir -p $R/profile $R/tests; p profile
timeout 600 python3 -m benchmarks.gpu_decode_profile --out $R/profile \
  --rows bf16,w4a16-marlin,w4a16-machete > $R/profile/log 2>&1
p "profile rc=$?"
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 600 -k "not isq and not two_gpus" > $R/tests/summary 2>&1
p "tests rc=$?"
p "ALL DONE"
