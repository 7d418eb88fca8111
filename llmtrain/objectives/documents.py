"""Document ids of packed windows, for document-aware attention (`data.document_attention=true`).

Every document in a corpus or shard set is followed by EOS, so a window's documents can be read off the
window itself: a token belongs to the document whose EOS is the next one at or after it. The ids are
relative to the window (0, 1, 2, ...); the models turn them into block-diagonal attention masks, so a token
attends only to tokens of its own document (and, in a causal stack, only to earlier ones). Positions are not
reset at document starts: rotary and T5 relative positions depend on distances only, so a document attends
exactly as it would alone; learned absolute positions keep the window offset (as in torchtitan).
"""

from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(..., T) int64: the index within the window of each token's document; EOS ends its document."""
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(-1) - is_eos
