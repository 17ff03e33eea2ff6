#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 14:50 lease (one H200): where W4A16's batch-1 decode step goes against
# bf16 (benchmarks.gpu_decode_profile: torch profiler, kernels by kind, bandwidth), then
# the one-GPU tests: the per-GPU engine-start lock's first GPU run (base and X-LoRA
# replicas share the card) and X-LoRA parity with peft scoring in one forward pass.
cd /tmp/work
START=$(date +%s)
R=/tmp/results
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
mkdir -p $R/profile $R/tests; p profile
timeout 720 python3 -m benchmarks.gpu_decode_profile --out $R/profile > $R/profile/log 2>&1
p "profile rc=$?"
OUT=$R/tests bash benchmarks/gpu_lab/run-tests.sh 600 -k "not isq and not two_gpus" > $R/tests/summary 2>&1
p "tests rc=$?"
p "ALL DONE"
