"""How the measured matmul peak (the MFU denominator bench.py uses) depends on what the probe multiplies:
square sizes, random or constant data, probe length. `measure_matmul_peak` multiplies random 8192^2 bf16
matrices for 0.25 s on CUDA; DESIGN.md quotes ~790 TFLOP/s for an 8192^3 bf16 matmul on the lent H100/H200,
bench.py measured 670-710 there. This prints the grid, so the figure an MFU is divided by is known.

    python scripts/profiling/matmul_peak.py [--sizes 4096 8192 16384] [--seconds 0.25 1.0]
"""

import argparse

import torch

from llmtrain.measure.flops import _run_matmuls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cuda = torch.cuda.is_available()
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192, 16384] if cuda else [512, 1024])
    parser.add_argument("--seconds", nargs="+", type=float, default=[0.25, 1.0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, {args.dtype}")
    for size in args.sizes:
        for data in ("randn", "ones"):
            make = torch.randn if data == "randn" else torch.ones
            a = make(size, size, device=device).to(dtype)
            b = make(size, size, device=device).to(dtype)
            _run_matmuls(a, b, 0.1)  # warm-up
            for seconds in args.seconds:
                iterations, elapsed = _run_matmuls(a, b, seconds)
                tflops = 2.0 * size**3 * iterations / elapsed / 1e12
                print(f"{size:6d}^3 {data:5s} {seconds:5.2f} s: {tflops:9.3f} TFLOP/s", flush=True)
            del a, b


if __name__ == "__main__":
    main()
