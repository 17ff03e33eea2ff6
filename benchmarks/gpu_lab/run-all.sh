#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 08:19 lease (one H200): X-LoRA non-granular with its real pass compiled
# by vLLM (XLoraRealPass). Its first run (08:19-08:27) answered nonsense under CUDA graphs
# (parity against peft: max |log-prob difference| 24): the piecewise graphs of prompt steps
# read the expert weights where they lay at capture. With the weights in a static buffer
# (08:28-08:33): GPU parity 157 / 160 greedy steps, max 0.277. Single 256-token runs of the
# decode rows moved too much between runs (base at batch 64: 20,197-25,560 tok/s), so the
# last run (08:37-) repeats each measurement 5 times (median) for the three rows.
cd /tmp/work
START=$(date +%s)
R=/tmp/results
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
mkdir -p $R/decode6; p decode6
timeout 420 python3 -m benchmarks.gpu_decode --rows xlora --out $R/decode6 \
  --only "base (CUDA graphs),X-LoRA non-granular (CUDA graphs; as served),X-LoRA granular (CUDA graphs; as served)" \
  > $R/decode6/log 2>&1
p "decode6 rc=$?"
p "ALL DONE"
