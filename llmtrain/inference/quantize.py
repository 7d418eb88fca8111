"""Weight-only post-training quantization for evaluation and generation: int8 with one scale per output
channel (symmetric, absmax), and plain bf16 / fp16 casts. Activations stay in floating point; each int8
weight is dequantized on the fly inside its layer's forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.positions import RelativePositionBias

PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with weight[i] ~= q[i] * scale[i]: scale = max |row| / 127 (absmax)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear whose weight (out, in) is stored as int8 with one fp32 scale per output channel."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Int8Embedding(nn.Module):
    """An embedding table (V, d) stored as int8 with one scale per row; a head tied to it gets one scale
    per output channel (the same int8 tensor serves both)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale[ids][..., None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every Linear and embedding table (tokens, learned positions, token types) of model, in place,
    by its int8 form; a tied head and its embedding keep sharing one int8 tensor. Norms, biases and T5's
    relative position bias (a few numbers per head) stay as they are."""
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(fp weight) -> its int8 form

    def int8_of(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(weight) not in shared:
            shared[id(weight)] = quantize_rows(weight)
        return shared[id(weight)]

    replaced: dict[int, nn.Module] = {}  # a module reachable by two names (encoder/decoder embed) once
    for parent in list(model.modules()):
        if isinstance(parent, RelativePositionBias):
            continue
        for name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
            elif isinstance(child, nn.Linear):
                replaced[id(child)] = Int8Linear(*int8_of(child.weight), child.bias)
                setattr(parent, name, replaced[id(child)])
            elif isinstance(child, nn.Embedding):
                replaced[id(child)] = Int8Embedding(*int8_of(child.weight))
                setattr(parent, name, replaced[id(child)])
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights: parameters and persistent buffers, each shared tensor once."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def with_precision(model: nn.Module, precision: str) -> nn.Module:
    """model (fp32, modified in place) at fp32, bf16, fp16 or int8 (weight-only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    if precision == "int8":
        return quantize_int8(model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return model.to(dtype)
