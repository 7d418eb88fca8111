"""Keys and values of past positions, for incremental decoding (generation); training never makes one."""

from __future__ import annotations

import torch


class LayerCache:
    """One block's cache: self-attention keys/values (B, n_kv_heads, length, head_dim), growing by each call,
    and cross-attention keys/values of the encoder output, projected once."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.cross_keys: torch.Tensor | None = None
        self.cross_values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this call's keys/values after the cached ones; return all of them."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values


class KVCache:
    """A cache per block of one stack; `length` is the number of positions already decoded."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length
