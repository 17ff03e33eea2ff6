"""LoRA adapters (peft format) and X-LoRA mixtures served on the base model.

`registry.py` validates and names adapters (from JSON and safetensors headers only),
`base_model.py` holds what they must agree with, `slots.py` is one replica's resident
set and its eviction order, `synthetic.py` makes small real adapters for tests and
benchmarks, `placement.py` plans which replicas hold which adapter (the placement
controller in `deployments/controller.py` runs it), and `xlora/` the X-LoRA mixtures.
"""
