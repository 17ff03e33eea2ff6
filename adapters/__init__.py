"""LoRA adapters (peft format) and X-LoRA mixtures served on the base model.

Adapter loading, validation and placement arrive with the front-router issue; this
package is where they live so that `cluster.yaml` and the router can refer to them.
"""
