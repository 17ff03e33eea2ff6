"""Checkpoint sizes from safetensors headers (no tensors are read: safetensors'
`safe_open` reads the header and maps the file, and slices report dtype and shape).

The report compares a quantized checkpoint with the base at bfloat16, the precision a
GPU serves it in, whatever dtype the base directory happens to store: the whole
checkpoint, and the quantized Linear layers alone (the tied embedding and the norms
stay in bfloat16 and dominate a small model's bytes).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
# Parameters of the Linear layers inside the decoder blocks, in base or quantized form.
_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensors(directory: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="numpy") as checkpoint:
            for name in checkpoint.keys():
                tensor = checkpoint.get_slice(name)
                out[name] = (tensor.get_dtype(), tensor.get_shape())
    return out


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _DTYPE_BYTES[dtype]


def _is_linear(name: str) -> bool:
    return any(f".{p}." in name for p in _LINEAR)


def compare(base_dir: Path, quantized_dir: Path) -> dict[str, int | float]:
    base, quant = tensors(base_dir), tensors(quantized_dir)
    base_bf16 = sum(_nbytes("BF16", s) for d, s in base.values())
    base_linear_bf16 = sum(_nbytes("BF16", s) for n, (d, s) in base.items() if _is_linear(n))
    quant_total = sum(_nbytes(d, s) for d, s in quant.values())
    quant_linear = sum(_nbytes(d, s) for n, (d, s) in quant.items() if _is_linear(n))
    return {
        "base_bf16": base_bf16,
        "base_linear_bf16": base_linear_bf16,
        "quantized": quant_total,
        "quantized_linear": quant_linear,
        "ratio": quant_total / base_bf16,
        "linear_ratio": quant_linear / base_linear_bf16,
    }
