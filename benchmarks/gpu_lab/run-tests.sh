# Device side: the GPU tests, after setup.sh. Output under $OUT. Arguments: the time
# limit in seconds (default 560), then any pytest options (e.g. -k "not isq").
export RUVLLM_GPU_RESULTS=$OUT
limit=${1:-560}
shift
timeout $limit python3 -m pytest tests/gpu tests/test_vllm_compat.py -v -rs -p no:cacheprovider \
  --durations=0 "$@" > $OUT/gpu-tests.log 2>&1
echo "pytest exit $?"
grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|GPU Serve|^E " $OUT/gpu-tests.log | head -120
