"""KV cache in per-sequence slots, driven through Hugging Face's ``Cache`` interface.

Legend: S = slots, H = KV heads, P = positions per slot, Dh = head dim, b = rows of a forward, q = query tokens per row.

Storage per layer: K, V [S, H, P + q_max, Dh] (``q_max`` spare positions absorb the writes of padded
query tokens); on CPU all layers' K (and V) are one block on transparent huge pages (``remix.kernels.cpu_alloc``), which
a decode step reads through (its attention ~3-5 % faster than on 4 KiB pages on the Zen 5 VM). The engine keeps the rows of each forward in *contiguous* slots, so the K/V handed to
attention is a view ``K[s0:s0+b, :, :span]`` (no gather, no concatenation); the boolean mask hides
every position a row must not see (other rows' lengths, its own future, padding).

An 8-bit cache (``kv_dtype=torch.int8``, the server's ``--kv-cache-dtype int8``) stores each head's row at a position as
Dh int8 values and one float32 scale (:func:`quantize_kv`): Dh + 4 bytes against bfloat16's 2 Dh, so twice the
sequences (or the context) in one memory budget, and a decode step's attention, bound by reading K and V, reads half.
V keeps the layout above; K is stored in blocks of 16 positions with pairs of dimensions inner (:func:`to_key_blocks`),
which the compiled attention scores a block to a vector.
The lean forward's compiled attention reads the codes directly, decode and prefill tokens alike
(``decode_attention_q8`` / ``slot_attention_q8``); every other reader (``--decoder exact`` or ``hf``, SDPA) gets it
back dequantized (:meth:`read`, :func:`dequantize_kv`) in the model's dtype. Lossy: each value within
half a step (max|x| / 254) of its head's row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from remix.kernels import cpu_ext
from remix.kernels.cpu_alloc import empty_huge


KV_DTYPES = ("auto", "int8")  # the server's --kv-cache-dtype: auto = the model's dtype


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] -> (int8 [..., Dh], float32 scales [...]): s = max|x| / 127 over each row, c = round(x / s) (ties to
    even), 0 where s is 0; x ~ s * c. The compiled ``kv_write_q8_`` does the same arithmetic (bit-identical)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127
    s = scale[..., None]
    codes = torch.where(s > 0, xf / s, 0.0).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale[..., None]).to(dtype)


KEY_BLOCK = 16  # an 8-bit cache keeps K in blocks of 16 positions, pairs of dimensions inner


def to_key_blocks(codes: torch.Tensor) -> torch.Tensor:
    """[..., P, Dh] (P a multiple of 16) -> [..., P / 16, Dh / 2, 16, 2]: position p's dimensions (2e, 2e + 1) at
    [p / 16, e, p % 16]. The compiled decode attention scores 16 positions a vector from it, with no horizontal sums."""
    *lead, P, Dh = codes.shape
    return codes.reshape(*lead, P // KEY_BLOCK, KEY_BLOCK, Dh // 2, 2).transpose(-3, -2).contiguous()


def from_key_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_key_blocks` (a copy)."""
    *lead, nb, half, kb, two = blocks.shape
    return blocks.transpose(-3, -2).reshape(*lead, nb * kb, half * two)


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, slots: int, positions: int, kv_heads: int, head_dim: int, spare: int,
                 dtype: torch.dtype, device: torch.device | str, kv_dtype: torch.dtype | None = None):
        super().__init__(layers=[])
        self.slots, self.positions, self.spare = slots, positions, spare
        self.dtype = dtype  # what the model computes in (and reads dequantized K/V as)
        self.quantized = kv_dtype == torch.int8
        if kv_dtype not in (None, dtype, torch.int8):
            raise ValueError(f"kv_dtype must be None, the model's dtype or torch.int8, got {kv_dtype}")
        store = torch.int8 if self.quantized else dtype
        if self.quantized:  # whole key blocks of 16 positions
            spare = -(-(positions + spare) // KEY_BLOCK) * KEY_BLOCK - positions
            self.spare = spare
        shape = (slots, kv_heads, positions + spare, head_dim)

        def blocks(shape, dtype) -> list[torch.Tensor]:
            if torch.device(device).type == "cpu":  # every layer's K (and V) in one block on transparent huge pages
                return list(empty_huge((num_layers, *shape), dtype).zero_().unbind(0))
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

        self.v = blocks(shape, store)
        if self.quantized:  # [S, H, P / 16, Dh / 2, 16, 2] (see to_key_blocks)
            if head_dim % 2:
                raise ValueError(f"an 8-bit cache needs an even head dim, got {head_dim}")
            self.k = blocks((*shape[:2], shape[2] // KEY_BLOCK, head_dim // 2, KEY_BLOCK, 2), store)
        else:
            self.k = blocks(shape, store)
        # an 8-bit cache's float32 scales [S, H, P + spare] a layer, else empty lists
        self.ks, self.vs = ([], []) if not self.quantized else \
            (blocks(shape[:3], torch.float32), blocks(shape[:3], torch.float32))
        self._rows = slice(0, 0)
        self._write_index: tuple | None = None  # (row [b, q], position [b, q]) of every query token
        self._span = 0

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                        kv_dtype: torch.dtype | None = None) -> int:
        if kv_dtype == torch.int8:  # int8 values and a float32 scale per head
            return num_layers * 2 * kv_heads * (head_dim + 4)
        return num_layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def prepare(self, first_slot: int, positions: torch.Tensor, span: int) -> None:
        """Set up the next forward: rows are slots [first_slot, first_slot + b); positions [b, q] where
        each query token's K/V goes; attention will read positions [0, span)."""
        b, q = positions.shape
        self._rows = slice(first_slot, first_slot + b)
        self._write_index = (torch.arange(b, device=positions.device)[:, None].expand(b, q), positions)
        self._span = span

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Store the prepared forward's keys and values [b, H, q, Dh] of one layer (quantized in an 8-bit cache)."""
        K, V = self.k[layer_idx], self.v[layer_idx]
        ext = cpu_ext.for_input(key_states) if K.is_cpu else None
        pos = self._write_index[1]
        direct = ext is not None and key_states.stride(-1) == 1 and value_states.stride(-1) == 1
        if self.quantized:
            Ks, Vs = self.ks[layer_idx], self.vs[layer_idx]
            if direct:  # quantized as they are copied
                ext.kv_write_q8_(K, Ks, key_states, self._rows.start, pos)
                ext.kv_write_q8_(V, Vs, value_states, self._rows.start, pos)
                return
            rows = self._write_index[0] + self._rows.start  # [b, q], beside pos
            for cache, scales, fresh in ((K, Ks, key_states), (V, Vs, value_states)):
                codes, scale = quantize_kv(fresh)  # [b, H, q, Dh], [b, H, q]
                scales[self._rows].transpose(1, 2).index_put_(self._write_index, scale.transpose(1, 2))
                if cache is V:
                    V[self._rows].transpose(1, 2).index_put_(self._write_index, codes.transpose(1, 2))
                else:  # K[row, :, p // 16, :, p % 16, :]: [b, q] indices first, then [H, Dh / 2, 2]
                    b, H, q, Dh = codes.shape
                    blocked = codes.permute(0, 2, 1, 3).reshape(b, q, H, Dh // 2, 2)
                    K[rows, :, pos // KEY_BLOCK, :, pos % KEY_BLOCK] = blocked
            return
        key_states, value_states = key_states.to(K.dtype), value_states.to(V.dtype)
        if direct:
            ext.kv_write_(K, key_states, self._rows.start, pos)  # a memcpy per head and token
            ext.kv_write_(V, value_states, self._rows.start, pos)
        else:  # index_put_ on the [b, P, H, Dh] view: one copy per token (scatter_ is ~50x slower for bfloat16 on CPU)
            K[self._rows].transpose(1, 2).index_put_(self._write_index, key_states.transpose(1, 2))
            V[self._rows].transpose(1, 2).index_put_(self._write_index, value_states.transpose(1, 2))

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, H, span, Dh] of the prepared rows: views, or dequantized copies of an 8-bit cache."""
        span = self._span
        if not self.quantized:
            return self.k[layer_idx][self._rows, :, :span], self.v[layer_idx][self._rows, :, :span]
        k = from_key_blocks(self.k[layer_idx][self._rows, :, : -(-span // KEY_BLOCK)])[:, :, :span]
        ks, vs = self.ks[layer_idx][self._rows, :, :span], self.vs[layer_idx][self._rows, :, :span]
        return dequantize_kv(k, ks, self.dtype), dequantize_kv(self.v[layer_idx][self._rows, :, :span], vs, self.dtype)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
        # transformers' attention modules pass cache_kwargs (before 5.24) or kwargs= (5.24 on): neither is used here
        self.write(key_states, value_states, layer_idx)
        return self.read(layer_idx)

    def decode_args(self) -> tuple:
        """Every layer's whole K and V, the first slot, the write positions [b, q] of the prepared forward and an 8-bit
        cache's scales (else empty lists): what the compiled decode stack (``DecodeStack.run``) writes and reads."""
        return self.k, self.v, self._rows.start, self._write_index[1], self.ks, self.vs

    def storage(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Layer ``layer_idx``'s whole K and V [S, H, P + spare, Dh] (an 8-bit cache's K in blocks: see
        :func:`to_key_blocks`) and the first slot of the prepared forward."""
        return self.k[layer_idx], self.v[layer_idx], self._rows.start

    def scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An 8-bit cache's scales [S, H, P + spare] of layer ``layer_idx``."""
        return self.ks[layer_idx], self.vs[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._span, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def _tensors(self, length: int) -> list[tuple[torch.Tensor, int]]:
        """Every stored tensor with how far along dim 2 the first ``length`` positions reach (whole key blocks)."""
        blocks = -(-length // KEY_BLOCK) if self.quantized else length
        return [*((k, blocks) for k in self.k), *((t, length) for t in (*self.v, *self.ks, *self.vs))]

    def move(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Copy slot ``src``'s positions [start, length) into slot ``dst`` (all layers; an 8-bit cache from the start
        of ``start``'s key block, so codes and scales come from one slot)."""
        if self.quantized:
            start -= start % KEY_BLOCK
        for t, n in self._tensors(length):
            s = start // KEY_BLOCK if (self.quantized and t.dim() == 6) else start
            t[dst, :, s:n] = t[src, :, s:n]

    def swap(self, a: int, b: int, length: int) -> None:
        for t, n in self._tensors(length):
            tmp = t[a, :, :n].clone()
            t[a, :, :n] = t[b, :, :n]
            t[b, :, :n] = tmp


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
