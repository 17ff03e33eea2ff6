# Device side, sourced from the repo root after `. .gpu/p2/device.sh; . .gpu/x1/setup.sh`
# ran earlier on this warm machine (/tmp/site, /tmp/site-ruvllm, PYTHONPATH, PATH ready).
# Runs tests/gpu/test_isq_gpu.py: a GPTQ W4A16 ISQ job on the GPU (toolkit venv installed
# offline from the wheelhouse .gpu/isq0 [+ .gpu/isq1 if carried]), served by vLLM, gated.
# Output: $OUT/isq-gpu.log, $OUT/isq-gpu.json, $OUT/isq-reports/, $OUT/isq-ray-logs/.
. benchmarks/gpu_lab/isq-env.sh || { return 1 2>/dev/null || exit 1; }
set -o pipefail
timeout 480 python3 -m pytest tests/gpu/test_isq_gpu.py -v -rs -p no:cacheprovider --durations=0 2>&1 | tee $OUT/isq-gpu.log
echo "[run-isq] pytest exit $?"
set +o pipefail
mkdir -p $OUT/isq-reports $OUT/isq-ray-logs
for r in ~/.cache/ruvllm/isq/*/isq-report.json; do [ -f "$r" ] && cp "$r" "$OUT/isq-reports/$(basename $(dirname $r)).json"; done
ls ~/.cache/ruvllm/isq/ 2>/dev/null
for f in $(grep -l -E "ruvllm isq|isq\]|CompressedTensorsWNA16|toolkit environment|Traceback" /tmp/ray/session_latest/logs/worker-* 2>/dev/null | head -20); do
  tail -c 150000 "$f" > "$OUT/isq-ray-logs/$(basename $f)"; done
grep -h -E "Using \w+ for CompressedTensorsWNA16|\[ruvllm isq\]|perplexity" /tmp/ray/session_latest/logs/worker-* 2>/dev/null | sort -u | head -40
echo "[run-isq] isq-gpu.json:"; head -c 4000 $OUT/isq-gpu.json 2>/dev/null; echo
