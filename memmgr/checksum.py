"""Checksums that verify a round trip: computed where the bytes live, asynchronously on the current stream.

The checksum is a position-weighted sum of the bytes (as 32-bit words, odd pseudo-random weights per position, int64
accumulation, in bounded chunks): any single changed byte is always detected, and swapped elements are detected
unless the weights collide (odds ~2^-31).
"""
from __future__ import annotations

import torch

_CHECKSUM_ROW_WORDS = 1 << 16       # 32-bit words weighted by one table of odd weights
_CHECKSUM_CHUNK_ROWS = 128          # rows per step: bounds the extra memory to 32 MiB (int32 products)


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX_C1 = _signed64(0x9E3779B97F4A7C15)
_MIX_C2 = _signed64(0xBF58476D1CE4E5B9)
_MIX_C3 = _signed64(0x94D049BB133111EB)
_word_weights: dict[torch.device, torch.Tensor] = {}


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style hash of int64 positions (wrapping arithmetic), deterministic on every device."""
    x = (x + 1) * _MIX_C1
    x = (x ^ (x >> 30)) * _MIX_C2
    x = (x ^ (x >> 27)) * _MIX_C3
    return x ^ (x >> 31)


def _weights_for(device: torch.device) -> torch.Tensor:
    """Odd 31-bit int32 weights for the positions of one row, made once per device (256 KiB)."""
    weights = _word_weights.get(device)
    if weights is None:
        h = _mix64(torch.arange(_CHECKSUM_ROW_WORDS, dtype=torch.int64, device=device))
        weights = ((h & 0x7FFFFFFF) | 1).to(torch.int32)
        _word_weights[device] = weights
    return weights


def bucket_checksum(flat: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 checksum of a 1-D contiguous tensor's bytes, computed where the tensor lives, asynchronously
    on the current stream. Words are weighted by position (odd weights, so one changed byte always changes the
    sum); extra memory is bounded by one chunk of int32 products."""
    device = flat.device
    data = flat.reshape(-1).view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=device)
    nbytes = data.numel()
    nwords = nbytes // 4
    full_rows, rem_words, tail_bytes = nwords // _CHECKSUM_ROW_WORDS, nwords % _CHECKSUM_ROW_WORDS, nbytes % 4
    nrows = full_rows + 2  # + the partial row of words + the row of leftover bytes
    weights = _weights_for(device)
    row_sums = torch.zeros(nrows, dtype=torch.int64, device=device)
    words = data[:nwords * 4].view(torch.int32) if nwords else None
    if full_rows:
        step = min(_CHECKSUM_CHUNK_ROWS, full_rows)
        products = torch.empty(step, _CHECKSUM_ROW_WORDS, dtype=torch.int32, device=device)
        for r0 in range(0, full_rows, step):
            r1 = min(full_rows, r0 + step)
            block = words[r0 * _CHECKSUM_ROW_WORDS:r1 * _CHECKSUM_ROW_WORDS].view(r1 - r0, _CHECKSUM_ROW_WORDS)
            out = products[:r1 - r0]
            torch.mul(block, weights, out=out)  # wraps modulo 2^32: still odd multiples of each word
            row_sums[r0:r1] = out.sum(dim=1, dtype=torch.int64)
    if rem_words:
        tail = words[full_rows * _CHECKSUM_ROW_WORDS:]
        row_sums[full_rows] = (tail * weights[:rem_words]).sum(dtype=torch.int64)
    if tail_bytes:
        leftover = data[nwords * 4:].to(torch.int32)
        row_sums[full_rows + 1] = (leftover * weights[:tail_bytes]).sum(dtype=torch.int64)
    row_weights = _mix64(torch.arange(nrows, dtype=torch.int64, device=device) + (nbytes << 1)) | 1
    return (row_sums * row_weights).sum()
