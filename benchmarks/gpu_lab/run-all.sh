#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 ~04:55 lease (one H200, 6.5 device-minutes left): X-LoRA non-granular with
# its real pass compiled by vLLM (XLoraRealPass) under CUDA graphs, beside its peer, the
# base with CUDA graphs, in one run. The 04:08 lease measured non-granular at 0.65x the
# base with the real pass captured uncompiled. Results in /tmp/results.
# Outcome: the lease's device time ran out 100 s into the non-granular row, after the base
# row (431 / 16,635 tok/s at batch 1 / 64); the compiled real pass stays on the branch
# xlora-compiled-real-pass until a lease measures it and its GPU parity.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/decode
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
p "decode rows"
timeout 400 python3 -m benchmarks.gpu_decode --rows xlora --out $R/decode \
  --only "X-LoRA non-granular (CUDA graphs; as served),base (CUDA graphs)" > $R/decode/log 2>&1
p "decode rows rc=$?"
p "ALL DONE"
