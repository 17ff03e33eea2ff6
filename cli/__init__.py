"""The `ruvllm` command (`ruvllm.cli.main:main`): operator tasks around a deployment.

It is the top floor: it drives the model store, the quantization jobs, the X-LoRA fixture
and the manifest rendering, so it lives above all of them rather than inside the ground
floor (`core/`) that they import.
"""
