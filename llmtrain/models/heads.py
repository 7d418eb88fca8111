"""The output every family returns and the loss it carries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmtrain.models.blocks import HeadTransform, init_weights
from llmtrain.models.config import ModelConfig

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, V); for the encoder given labels, (N, V) over its N labelled positions only."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy in nats over labelled positions (0 when there are none)."""
    n_targets: torch.Tensor | None = None
    """How many labelled positions the loss averages over."""


CPU_LOSS_CHUNK, GPU_LOSS_CHUNK = 1 << 20, 1 << 25
"""Logits per chunk of the loss: a chunk's fp32 copy stays in a CPU core's cache; on a GPU, a few large
chunks bound the fp32 temporaries without many small kernels."""


def loss_chunk_elements(device: torch.device) -> int:
    return CPU_LOSS_CHUNK if device.type == "cpu" else GPU_LOSS_CHUNK


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) of any dtype -> (N,) fp32 log-sum-exp; compiled, one pass reading the logits in their dtype."""
    return torch.logsumexp(logits.float(), dim=-1)


def _softmax_minus_onehot(
    logits: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """weight * (softmax - onehot) in the logits' dtype; ignored rows 0. Compiled: one pass, no fp32 copy."""
    p = torch.exp(logits.float() - lse[:, None]) * weight[:, None]
    cols = torch.arange(logits.shape[1], device=logits.device)
    p = p - torch.where(cols[None, :] == safe[:, None], weight[:, None], 0.0)
    return torch.where(valid[:, None], p, 0.0).to(logits.dtype)


def _chunked_logsumexp(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """The same as _row_logsumexp in eager ops, `rows` rows at a time through one reused fp32 buffer."""
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    shifted = None
    for start in range(0, logits.shape[0], rows):
        part = logits[start : start + rows]
        top = part.amax(dim=-1, keepdim=True).float()
        if shifted is None or shifted.shape != part.shape:
            shifted = torch.empty(part.shape, dtype=torch.float32, device=logits.device)
        torch.sub(part, top, out=shifted).exp_()
        torch.add(shifted.sum(dim=-1).log_(), top.squeeze(-1), out=lse[start : start + rows])
    return lse


_compiled: dict[str, object] = {}


def _fused(name: str):
    """The torch.compile'd form of one of the two functions above (made on first use)."""
    if name not in _compiled:
        fn = _row_logsumexp if name == "lse" else _softmax_minus_onehot
        _compiled[name] = torch.compile(fn, dynamic=None)
    return _compiled[name]


class CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of (N, V) logits of any dtype, reduced in fp32, over labels != IGNORE_INDEX.

    The same value and gradient as F.cross_entropy(logits.float(), labels, reduction="sum"), computed a chunk
    of rows at a time: forward keeps only each row's log-sum-exp, backward writes softmax - onehot straight
    into a gradient of the logits' dtype. The built-in path materialises the fp32 logits and their
    log-softmax (and, backward, a zero-filled fp32 gradient and its cast back) at full size.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        safe = labels.masked_fill(~valid, 0)
        rows = max(1, loss_chunk_elements(logits.device) // logits.shape[1])
        # generated kernels: one pass over the logits, no fp32 temporaries; else eager fp32 chunks
        lse = _fused("lse")(logits) if compiled else _chunked_logsumexp(logits, rows)
        target = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows, ctx.compiled = rows, compiled
        # an ignored row adds 0 even where its logits are not finite
        return torch.where(valid, lse - target, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        weight = valid.float() * grad_total  # d total / d row: the incoming gradient where the label counts
        if ctx.compiled:
            return _fused("grad")(logits, lse, weight, safe, valid), None, None
        grad = torch.empty_like(logits)
        chunk = None
        for start in range(0, logits.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            if grad.dtype == torch.float32:
                p = grad[rows]
            else:  # an fp32 chunk, cast on the copy into the gradient
                if chunk is None or chunk.shape != logits[rows].shape:
                    chunk = torch.empty(logits[rows].shape, dtype=torch.float32, device=logits.device)
                p = chunk
            torch.sub(logits[rows], lse[rows, None], out=p).exp_().mul_(weight[rows, None])
            p.masked_fill_(~valid[rows, None], 0.0)  # ignored rows: 0, whatever their logits
            p.scatter_add_(1, safe[rows, None], -weight[rows, None])
            if p is chunk:
                grad[rows] = p
        return grad, None, None


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean fp32 cross-entropy over labels != IGNORE_INDEX, and their count. No host sync.

    compiled: the loss's two passes as torch.compile'd kernels (parallel.compile on CUDA: chunked eager ops
    cost GPT-2 124M ~20 ms of a 64 ms H100 step, several fp32 passes over 0.8G logits)."""
    labels = labels.reshape(-1)
    n_targets = (labels != IGNORE_INDEX).sum()
    with torch.autocast(logits.device.type, enabled=False):
        total = CrossEntropySum.apply(logits.reshape(-1, logits.shape[-1]), labels, compiled)
    return total / n_targets.clamp(min=1), n_targets


class LanguageModel(nn.Module):
    """What the three families share: the config, the output head (tied or not) and init_weights()."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.compiled_loss = False
        """The loss through generated kernels (set by parallel.compile on CUDA)."""
        self.head_transform = HeadTransform(cfg) if cfg.head_transform else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., d) -> logits (..., V)."""
        if self.head_transform is not None:
            h = self.head_transform(h)
        return self.lm_head(h)

    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def n_residual_layers(self) -> int:
        """The depth of the 1/sqrt(2*depth) output-projection scaling: the blocks of the residual stream (an
        encoder-decoder counts the blocks of both stacks, as one depth for every projection)."""
        return self.cfg.n_layers

    def tie_weights(self) -> None:
        """Share the embedding with the head; re-done after materialisation, which makes new tensors."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def init_weights(self) -> None:
        init_weights(self, self.cfg, self.n_residual_layers)
