# Device side: the GPU tests, after setup.sh. Output under $OUT. Arguments: the time
# limit in seconds (default 560), then any pytest options (e.g. -k "not isq").
export RUVLLM_GPU_RESULTS=$OUT
limit=${1:-560}
shift
# pytest-timeout (in the lent machines' image) ends the session itself 120 s before the hard
# limit, so the failures' tracebacks and the summary still print (12-02 09:48: the hard
# limit cut a failed parity test's traceback; 14:57: 30 s was shorter than the app's
# shutdown on the GPU).
session=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--session-timeout $((limit - 120))")
timeout $limit python3 -m pytest tests/gpu tests/test_vllm_compat.py -v -rs -p no:cacheprovider \
  --durations=0 $session "$@" > $OUT/gpu-tests.log 2>&1
echo "pytest exit $?"
grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|GPU Serve|^E " $OUT/gpu-tests.log | head -120
