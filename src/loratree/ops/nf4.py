"""4-bit NormalFloat (NF4) blockwise quantization with double quantization (QLoRA).

Semantics (the naive formula the tests use), for a weight ``w`` flattened to ``n`` values
and cut into blocks of ``block`` consecutive values (the last block may be shorter):

    absmax[k] = max |w[i]| over block k
    code[i]   = argmin_j |NF4[j] - w[i] / absmax[k]|     (ties go to the lower code)
    w_hat[i]  = NF4[code[i]] * absmax[k]

Two codes share a byte, the first in the high nibble; an odd ``n`` pads with the code of
0.0. Double quantization stores ``absmax`` itself in 8 bits: ``c = mean(absmax)``, then
``absmax - c`` is quantized blockwise (blocks of 256) to the signed 8-bit dynamic code,
with one fp32 absmax per 256 blocks. That is the QLoRA paper's scheme and bitsandbytes'
``compress_statistics=True`` layout, so codes and dequantized values match it exactly.

Quantize and dequantize walk the weight in chunks of whole blocks, so a large matrix never
needs more than one float copy (the output) plus a chunk of temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "dequantize",
    "dequantize_blockwise",
    "dynamic_code",
    "quantize",
    "quantize_blockwise",
]

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982251167297, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
"""The 16 NF4 values of the QLoRA paper: quantiles of N(0, 1) scaled to [-1, 1], with an
exact zero (index 7). Sorted ascending."""

ZERO_CODE = 7
CHUNK = 1 << 18
"""Values per chunk of quantize / dequantize: a multiple of every block size used."""
STATS_BLOCK = 256


@cache
def dynamic_code() -> Tensor:
    """The signed 8-bit dynamic code (Dettmers, 8-bit approximations), 256 sorted values.

    Semantics: for exponent e = 0..6, 2^e evenly spaced fractions (midpoints of
    ``linspace(0.1, 1, 2^e + 1)``) times 10^(e - 6), with both signs; plus 0 and 1.
    Shape: (256,) fp32.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for e in range(7):  # fp32 arithmetic throughout, so the values match bitsandbytes' table
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        parts += [mids * 10.0 ** (e - 6), mids * -(10.0 ** (e - 6))]
    return torch.cat(parts).sort().values


GRID = 1 << 16
"""Points of the grid on [-1, 1] that 8-bit blockwise quantization rounds to first."""


@cache
def _grid_table(device: torch.device) -> Tensor:
    """For each of the GRID points -1 + 2 i / (GRID - 1), its nearest dynamic code index
    (a point exactly on a midpoint takes the lower code). Shape: (GRID,) uint8."""
    code = dynamic_code()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(GRID, dtype=torch.float32)) / (GRID - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8).to(device)


def _block_absmax(x: Tensor, block: int) -> Tensor:
    """Per-block max |x|; the last block may be short. Shape: (m,) -> (ceil(m / block),)."""
    full = x.numel() // block * block
    am = x[:full].view(-1, block).abs().amax(dim=1)
    if full < x.numel():
        am = torch.cat([am, x[full:].abs().amax().view(1)])
    return am


def quantize_blockwise(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """8-bit blockwise absmax quantization to the dynamic code (used for the NF4 scales).

    Semantics: absmax[k] = max |x| over block k; v = x[i] * (1 / absmax[k]) rounded to
    the nearest of GRID evenly spaced points on [-1, 1]; q[i] = the dynamic code nearest
    that point. The grid step (3e-5 of absmax) is 1/40 of the finest code spacing that
    matters here; it is bitsandbytes' CPU rounding, kept so the codes match it bit for bit.
    An all-zero block stores absmax 0 and codes 0.
    Shape: x (m,) float -> (q (m,) uint8, absmax (ceil(m / block),) fp32).
    """
    x = x.reshape(-1).float()
    absmax = _block_absmax(x, block)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    v = (x * inv.repeat_interleave(block)[: x.numel()]).clamp_(-1.0, 1.0)
    point = ((v + 1.0) * 0.5 * (GRID - 1) + 0.5).to(torch.int64)  # truncation, as a C cast
    q = _grid_table(x.device)[point]
    zero = (absmax == 0).repeat_interleave(block)[: x.numel()]
    return q.masked_fill_(zero, 0), absmax


def dequantize_blockwise(q: Tensor, absmax: Tensor, block: int) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: dynamic_code[q[i]] * absmax[k] (fp32).

    Shape: q (m,) uint8, absmax (ceil(m / block),) -> (m,) fp32.
    """
    vals = dynamic_code().to(q.device)[q.long()]
    out = torch.empty_like(vals)
    _times_scales(vals, absmax, block, out)
    return out


def _nf4_codes(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """NF4 codes and block absmax of fp32 values ``x`` (one chunk of whole blocks).

    Scaled values are x * (1 / absmax) (a short last block divides), clamped to [-1, 1],
    and rounded at the midpoints between codes, a midpoint itself going to the lower code:
    bitsandbytes' rounding, kept so codes match it bit for bit.
    Shape: (m,) -> ((m,) uint8, (ceil(m / block),) fp32).
    """
    absmax = _block_absmax(x, block)
    safe = absmax.clamp(min=1e-38)
    full = x.numel() // block * block
    scaled = (x[:full].view(-1, block) * (1.0 / safe[: full // block]).view(-1, 1)).view(-1)
    if full < x.numel():
        scaled = torch.cat([scaled, x[full:] / safe[-1]])
    code = NF4_CODE.to(x.device)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled.clamp_(-1.0, 1.0), midpoints).to(torch.uint8), absmax


@dataclass(frozen=True)
class NF4Weight:
    """A quantized weight: packed codes plus the constants to undo the scaling.

    ``absmax`` is fp32 ``(blocks,)`` without double quantization; with it, ``absmax`` is
    uint8 codes of ``absmax - offset`` in the dynamic code, ``absmax2`` their fp32 scales
    ``(ceil(blocks / 256),)`` and ``offset`` a 0-d fp32 tensor.
    """

    packed: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    block: int = 64
    absmax2: Tensor | None = None
    offset: Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double(self) -> bool:
        return self.absmax2 is not None

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.packed, self.absmax, self.absmax2, self.offset)
                     if t is not None)

    def nbytes(self) -> int:
        """Bytes of every stored tensor: packed codes plus quantization constants."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    def block_scales(self) -> Tensor:
        """The fp32 absmax of every block, dequantized if double-quantized. (blocks,)"""
        if self.absmax2 is None:
            return self.absmax
        assert self.offset is not None
        scales = dequantize_blockwise(self.absmax, self.absmax2, STATS_BLOCK)
        return scales + self.offset


def _pack(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, the first high. Shape: (m,) uint8 -> (ceil(m / 2),)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize(w: Tensor, block: int = 64, double: bool = True) -> NF4Weight:
    """NF4-quantize ``w`` blockwise, with optional double quantization of the scales.

    Semantics: see the module docstring. Works in chunks of ``CHUNK`` values, so memory
    beyond the packed result is one chunk of fp32 temporaries.
    Shape: w (any shape, n values, any float dtype) -> packed (ceil(n / 2),) uint8,
    absmax (ceil(n / block),).
    """
    if CHUNK % (2 * block):
        raise ValueError(f"block must divide {CHUNK // 2}, got {block}")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // block), dtype=torch.float32, device=w.device)
    for start in range(0, n, CHUNK):
        q, am = _nf4_codes(flat[start:start + CHUNK].float(), block)
        packed[start // 2:start // 2 + (q.numel() + 1) // 2] = _pack(q)
        absmax[start // block:start // block + am.numel()] = am
    shape = tuple(w.shape)
    if not double:
        return NF4Weight(packed, absmax, shape, block)
    offset = absmax.mean()
    q_absmax, absmax2 = quantize_blockwise(absmax - offset, STATS_BLOCK)
    return NF4Weight(packed, q_absmax, shape, block, absmax2, offset)


@cache
def _pair_table(device: torch.device) -> Tensor:
    """Both NF4 values of every byte, as one 8-byte word per byte.

    Row b holds (NF4[b >> 4], NF4[b & 15]) as two float32 reinterpreted as one int64, so
    a single 1-D ``index_select`` per packed byte yields both values (a 2-D gather is
    several times slower on CPU). Shape (256,) int64.
    """
    b = torch.arange(256)
    pairs = torch.stack([NF4_CODE[b >> 4], NF4_CODE[b & 15]], dim=1).contiguous()
    return pairs.view(torch.int64).view(-1).to(device)


def dequantize(q: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The exact inverse of :func:`quantize`: NF4[code] * absmax, rounded once to ``dtype``.

    Semantics: w_hat[i] = NF4[code[i]] * absmax[block of i], in fp32, then cast.
    Shape: -> ``q.shape``.
    """
    n, block = q.numel, q.block
    scales = q.block_scales()
    table = _pair_table(q.packed.device)
    out = torch.empty(n, dtype=dtype, device=q.packed.device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        words = table.index_select(0, q.packed[start // 2:(stop + 1) // 2].int())
        vals = words.view(torch.float32)[: stop - start]
        _times_scales(vals, scales[start // block:], block, out[start:stop])
    return out.view(q.shape)


def _times_scales(vals: Tensor, scales: Tensor, block: int, out: Tensor) -> None:
    """``out = vals * scale of its block`` (cast to out's dtype).

    Shape: vals (m,) fp32, scales (>= ceil(m / block),), out (m,).
    """
    m = vals.numel()
    full = m // block * block
    rows = full // block
    if out.dtype == vals.dtype:
        torch.mul(vals[:full].view(rows, block), scales[:rows].view(-1, 1),
                  out=out[:full].view(rows, block))
    else:
        out[:full] = (vals[:full].view(rows, block) * scales[:rows].view(-1, 1)).view(-1)
    if full < m:
        out[full:] = vals[full:] * scales[rows]
