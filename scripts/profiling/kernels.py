"""Forward + backward time of each hand-written op of the block library against autograd through the formula
or built-in it replaces, on decoder_small's shapes (B 16 x T 256, d 384, 6 heads, SwiGLU 1024, vocab 4096).
Min over repetitions, the two sides interleaved; this machine's threads.

    python scripts/profiling/kernels.py [--reps 7] [--dtype bf16|fp32]
    python scripts/profiling/kernels.py --matmuls      # fp32 and bf16 GFLOP/s of the step's matmul shapes
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmtrain.models import blocks, heads
from llmtrain.models.positions import Rotary


def timed(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def matmul_rates(reps: int) -> None:
    """fp32 and bf16 rates of decoder_small's matmuls (tokens x d into the fused projections, the MLP down
    projection, the head, a weight gradient) and of square ones: what bf16 can gain on this CPU."""
    shapes = [(4096, 384, 1152), (4096, 384, 2048), (4096, 2048, 384), (4096, 384, 4096), (2048, 4096, 384)]
    shapes += [(2048, 2048, 2048), (4096, 4096, 4096)]
    print(f"matmul (m, k, n), {torch.get_num_threads()} threads, min of {reps}: GFLOP/s fp32, bf16, ratio")
    for m, k, n in shapes:
        rates = []
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b  # warm-up
            rates.append(2 * m * k * n / timed(lambda a=a, b=b: a @ b, reps) / 1e6)
        print(f"  ({m}, {k}, {n}): {rates[0]:.0f}, {rates[1]:.0f}, {rates[1] / rates[0]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--matmuls", action="store_true", help="only the fp32 and bf16 matmul rates")
    args = parser.parse_args()
    if args.matmuls:
        matmul_rates(args.reps)
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    B, T, d, nh, hd, ff, V = 16, 256, 384, 6, 64, 1024, 4096

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape) * scale).to(dt).requires_grad_()

    # attention (causal): SDPA and the one-block matmul form against the query-block form
    q, k, v = (leaf(B, nh, T, hd) for _ in range(3))
    g_attn = torch.randn(B, nh, T, hd).to(dtype)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    scale = hd**-0.5
    attention = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g_attn),
        "matmul, one block": lambda: blocks._MatmulAttention.apply(q * scale, k, v, tril, False).backward(
            g_attn
        ),
        "matmul, 4 query blocks (llmtrain)": lambda: blocks._CausalBlockAttention.apply(
            q * scale, k, v, 4
        ).backward(g_attn),
    }
    # RMSNorm on the fp32 residual stream
    x = leaf(B, T, d, dt=torch.float32)
    norm = blocks.RMSNorm(d)
    g_norm = torch.randn(B, T, d)

    def rms_formula():
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        y.backward(g_norm)

    # the fused q/k/v projection split into rotated heads
    rotary = Rotary(hd, T, 10000.0)
    qkv = leaf(B, T, 3 * d)
    g_heads = [torch.randn(B, nh, T, hd).to(dtype) for _ in range(3)]

    def rotary_formula():
        parts = [t.unflatten(-1, (nh, hd)).transpose(1, 2) for t in qkv.split(d, dim=-1)]
        q_, k_ = rotary(parts[0], parts[1])
        torch.autograd.backward([q_, k_, parts[2]], g_heads)

    def rotary_ours():
        torch.autograd.backward(list(rotary.split_rotate(qkv, nh, nh)), g_heads)

    # SwiGLU on the fused [gate | up]
    h = leaf(B, T, 2 * ff)
    g_mlp = torch.randn(B, T, ff).to(dtype)

    def glu_formula():
        gate, up = h.chunk(2, dim=-1)
        (F.silu(gate) * up).backward(g_mlp)

    # the loss over (B*T, V) logits
    logits = leaf(B * T, V, scale=3.0)
    labels = torch.randint(0, V, (B * T,))

    rows = {
        "attention, causal": attention,
        "RMSNorm (fp32 stream)": {"formula": rms_formula, "llmtrain": lambda: norm(x).backward(g_norm)},
        "q/k/v split + rotary": {"formula": rotary_formula, "llmtrain": rotary_ours},
        "SwiGLU on [gate | up]": {
            "formula": glu_formula,
            "llmtrain": lambda: blocks._GatedActivation.apply(h, True, "none").backward(g_mlp),
        },
        "cross-entropy (fp32 reduction)": {
            "F.cross_entropy(logits.float())": lambda: F.cross_entropy(
                logits.float(), labels, reduction="sum"
            ).backward(),
            "llmtrain": lambda: heads.CrossEntropySum.apply(logits, labels).backward(),
        },
    }
    print(f"{args.dtype}, {torch.get_num_threads()} threads; forward + backward, min of {args.reps} (ms)")
    for op, variants in rows.items():
        times = dict.fromkeys(variants, float("inf"))
        for _ in range(2):  # interleave the variants twice
            for name, fn in variants.items():
                times[name] = min(times[name], timed(fn, args.reps))
        print(f"  {op}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in times.items()))


if __name__ == "__main__":
    main()
