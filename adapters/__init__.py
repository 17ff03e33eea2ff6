"""LoRA adapters (peft format) and X-LoRA mixtures served on the base model.

`registry.py` validates and names adapters (from JSON and safetensors headers only),
`base_model.py` holds what they must agree with, `slots.py` is one replica's resident
set and its eviction order, `synthetic.py` makes small real adapters for tests and
benchmarks, and `xlora/` the X-LoRA mixtures. Which replica holds which adapter is
planned by `adapters/placement.py`, driven by `deployments/controller.py`.
"""
