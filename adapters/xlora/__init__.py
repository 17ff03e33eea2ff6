"""X-LoRA (Buehler & Buehler 2024): per-token, per-layer mixtures of LoRA experts,
served inside vLLM as the out-of-tree model `XLoraLlamaForCausalLM`."""
