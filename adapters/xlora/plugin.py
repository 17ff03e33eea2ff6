"""vLLM plugin entry point (`vllm.general_plugins` in pyproject.toml): vLLM calls
`register` in every process it starts, before it resolves a model architecture."""


def register() -> None:
    from vllm import ModelRegistry

    if "XLoraLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        # A "module:Class" string: vLLM imports it only when a model needs it.
        ModelRegistry.register_model("XLoraLlamaForCausalLM",
                                     "ruvllm.adapters.xlora.vllm_model:XLoraLlamaForCausalLM")
