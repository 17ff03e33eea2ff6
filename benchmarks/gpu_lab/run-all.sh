#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 04:40 lease (one H200; the two-GPU kind was not lent):
#   1. X-LoRA decode rows (benchmark b): the base with CUDA graphs, granular and
#      non-granular under CUDA graphs as replicas now serve them, non-granular eager as
#      served before; alone on the card, so the timings are clean.
#   2. The one-GPU tests (tests/gpu, vllm_compat) on this tree: the suite's Ray cluster in
#      Serve's high-throughput mode since 12-01, and X-LoRA parity in non-granular mode
#      under CUDA graphs (new), beside the ISQ job.
# Results in /tmp/results, progress lines in /tmp/results/progress.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/decode $R/isq $R/tests
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
(while true; do echo "== $(date +%T)"; top -b -n1 -w 220 -c | sed -n 7,20p | cut -c1-200
   nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; sleep 4; done) > $R/top.log 2>&1 &
p "decode rows"
timeout 480 python3 -m benchmarks.gpu_decode --rows xlora --out $R/decode > $R/decode/log 2>&1
p "decode rows rc=$?"
OUT=$R/isq . benchmarks/gpu_lab/isq-env.sh >> $R/progress 2>&1 || p "isq-env FAILED"
p "isq env ready"
RUVLLM_GPU_RESULTS=$R/tests timeout 560 python3 -m pytest tests/gpu tests/test_vllm_compat.py \
  -v -rs -p no:cacheprovider --durations=0 > $R/tests/gpu-tests.log 2>&1
p "tests done rc=$?"
ray stop --force > /dev/null 2>&1
p "ALL DONE"
