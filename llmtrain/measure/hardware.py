"""Accelerators the planner and MFU know by name: dense peak throughput and memory, from vendor data sheets.

Peaks are dense (no 2:4 sparsity). Memory is what `nvidia-smi` reports as total, in GiB; the usable part is
smaller (CUDA context, allocator fragmentation), which the memory estimator leaves room for.
"""

from __future__ import annotations

from dataclasses import dataclass

TERA = 1e12
GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float
    """Dense bf16 (= fp16) tensor-core peak, TFLOP/s."""
    tf32_tflops: float
    """Dense tf32 tensor-core peak (fp32 matmuls with allow_tf32), TFLOP/s."""
    fp32_tflops: float
    """Plain fp32 (no tensor cores), TFLOP/s."""
    memory_gib: float

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Peak FLOP/s for dtype bf16 | fp16 | tf32 | fp32."""
        table = {"bf16": self.bf16_tflops, "fp16": self.bf16_tflops, "tf32": self.tf32_tflops}
        table["fp32"] = self.fp32_tflops
        if dtype not in table:
            raise ValueError(f"dtype={dtype!r} has no peak; allowed: {', '.join(table)}")
        return table[dtype] * TERA


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("A100", bf16_tflops=312, tf32_tflops=156, fp32_tflops=19.5, memory_gib=80),
        Accelerator("A100-40GB", bf16_tflops=312, tf32_tflops=156, fp32_tflops=19.5, memory_gib=40),
        Accelerator("H100-SXM", bf16_tflops=989, tf32_tflops=494.7, fp32_tflops=66.9, memory_gib=79.6),
        Accelerator("H100-PCIe", bf16_tflops=756, tf32_tflops=378, fp32_tflops=51.2, memory_gib=79.6),
        Accelerator("H100-NVL", bf16_tflops=835, tf32_tflops=417.5, fp32_tflops=60, memory_gib=93.6),
        Accelerator("H200", bf16_tflops=989, tf32_tflops=494.7, fp32_tflops=66.9, memory_gib=140.4),
    )
}
ALIASES = {"h100": "H100-SXM", "a10080gb": "A100"}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def accelerator(name: str) -> Accelerator:
    """Look a device up by name, ignoring case and punctuation (`h100_sxm`, `H100 SXM`); H100 means SXM."""
    by_key = {_key(n): a for n, a in ACCELERATORS.items()}
    by_key.update({alias: ACCELERATORS[target] for alias, target in ALIASES.items()})
    if _key(name) not in by_key:
        raise ValueError(
            f"device {name!r} is not in the peak table ({', '.join(ACCELERATORS)}); "
            "name one of those or give its peak TFLOP/s and memory explicitly"
        )
    return by_key[_key(name)]


def accelerator_of_device(device_name: str) -> Accelerator | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3' or 'NVIDIA H200', if any."""
    name = device_name.upper()
    if "H200" in name:
        return ACCELERATORS["H200"]
    if "H100" in name:
        return ACCELERATORS["H100-PCIe" if "PCIE" in name else "H100-NVL" if "NVL" in name else "H100-SXM"]
    if "A100" in name:
        return ACCELERATORS["A100-40GB" if "40GB" in name else "A100"]
    return None
