"""KV cache in per-sequence slots, driven through Hugging Face's ``Cache`` interface.

Legend: S = slots, H = KV heads, P = positions per slot, Dh = head dim, b = rows of a forward, q = query tokens per row.

Storage per layer: K, V [S, H, P + q_max, Dh] (``q_max`` spare positions absorb the writes of padded
query tokens); on CPU all layers' K (and V) are one block on transparent huge pages (``remix.kernels.cpu_alloc``), which
a decode step reads through (its attention ~3-5 % faster than on 4 KiB pages on the Zen 5 VM). The engine keeps the rows of each forward in *contiguous* slots, so the K/V handed to
attention is a view ``K[s0:s0+b, :, :span]`` (no gather, no concatenation); the boolean mask hides
every position a row must not see (other rows' lengths, its own future, padding).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from remix.kernels import cpu_ext
from remix.kernels.cpu_alloc import empty_huge


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, slots: int, positions: int, kv_heads: int, head_dim: int, spare: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(layers=[])
        self.slots, self.positions, self.spare = slots, positions, spare
        shape = (slots, kv_heads, positions + spare, head_dim)
        if torch.device(device).type == "cpu":  # every layer's K (and V) in one block on transparent huge pages
            self.k = list(empty_huge((num_layers, *shape), dtype).zero_().unbind(0))
            self.v = list(empty_huge((num_layers, *shape), dtype).zero_().unbind(0))
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._rows = slice(0, 0)
        self._write_index: tuple | None = None  # (row [b, q], position [b, q]) of every query token
        self._span = 0

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def prepare(self, first_slot: int, positions: torch.Tensor, span: int) -> None:
        """Set up the next forward: rows are slots [first_slot, first_slot + b); positions [b, q] where
        each query token's K/V goes; attention will read positions [0, span)."""
        b, q = positions.shape
        self._rows = slice(first_slot, first_slot + b)
        self._write_index = (torch.arange(b, device=positions.device)[:, None].expand(b, q), positions)
        self._span = span

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
        # transformers' attention modules pass cache_kwargs (before 5.24) or kwargs= (5.24 on): neither is used here
        K, V = self.k[layer_idx], self.v[layer_idx]
        k, v = K[self._rows], V[self._rows]
        key_states, value_states = key_states.to(K.dtype), value_states.to(V.dtype)
        ext = cpu_ext.for_input(key_states) if K.is_cpu else None
        if ext is not None and key_states.stride(-1) == 1 and value_states.stride(-1) == 1:
            ext.kv_write_(K, key_states, self._rows.start, self._write_index[1])  # a memcpy per head and token
            ext.kv_write_(V, value_states, self._rows.start, self._write_index[1])
        else:  # index_put_ on the [b, P, H, Dh] view: one copy per token (scatter_ is ~50x slower for bfloat16 on CPU)
            k.transpose(1, 2).index_put_(self._write_index, key_states.transpose(1, 2))
            v.transpose(1, 2).index_put_(self._write_index, value_states.transpose(1, 2))
        return k[:, :, : self._span], v[:, :, : self._span]

    def decode_args(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int, torch.Tensor]:
        """Every layer's whole K and V, the first slot and the write positions [b, q] of the prepared forward: what the
        compiled decode stack (``DecodeStack.run``) writes and reads, as :meth:`update` and :meth:`storage` give them."""
        return self.k, self.v, self._rows.start, self._write_index[1]

    def storage(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Layer ``layer_idx``'s whole K and V [S, H, P + spare, Dh] and the first slot of the prepared forward."""
        return self.k[layer_idx], self.v[layer_idx], self._rows.start

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._span, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (all layers)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            tmp_k, tmp_v = k[a, :, :length].clone(), v[a, :, :length].clone()
            k[a, :, :length] = k[b, :, :length]
            v[a, :, :length] = v[b, :, :length]
            k[b, :, :length], v[b, :, :length] = tmp_k, tmp_v


def attention_mask(starts: torch.Tensor, counts: torch.Tensor, q: int, span: int) -> torch.Tensor:
    """Boolean [b, 1, q, span]: query j of row i (at position starts[i] + j) sees positions <= its own.

    Padded queries (j >= counts[i]) see position 0 only, so softmax never meets an all-masked row.
    """
    pos = torch.arange(span, device=starts.device)
    query_pos = starts[:, None] + torch.arange(q, device=starts.device)[None, :]  # [b, q]
    mask = pos[None, None, :] <= query_pos[:, :, None]  # [b, q, span]
    padded = torch.arange(q, device=starts.device)[None, :] >= counts[:, None]  # [b, q]
    mask = torch.where(padded[:, :, None], pos[None, None, :] == 0, mask)
    return mask[:, None]
