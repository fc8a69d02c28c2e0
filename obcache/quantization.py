"""Packed low-bit storage: asymmetric uniform quantization in groups (pure torch, no transformers).

A tensor x is cut into groups of g = `group_size` consecutive elements along one axis: the
head dim (per token, groups of g channels: KIVI's choice for values) or the token axis (per
channel, groups of g tokens: KIVI's choice for keys). Each group keeps a scale and a zero
(its offset) in float16, each element a code of b bits (2, 4 or 8):

    zero  = fl16_down(min)                          min, max over the group
    scale = fl16_up((max - zero) / (2^b - 1))
    code  = round_half_even((x - zero) / scale)     in [0, 2^b - 1]   (0 where scale = 0)
    x^    = zero + code * scale

Rounding zero down and scale up keeps [min, max] inside [zero, zero + (2^b - 1) scale], so no
code is clipped and every element obeys

    |x - x^| <= scale / 2,    scale <= (max - min + u16(min)) / (2^b - 1) + u16(scale)

with u16(y) the float16 spacing at y (2^-10 |y| for normal y, 2^-24 below 2^-14): the 16-bit
storage widens the exact step (max - min) / (2^b - 1) by at most these two spacings. A group
whose values are equal and representable in float16 gets scale 0 and is exact.
Float16 rather than bfloat16 for scale and zero (KIVI's choice too): 3 more mantissa bits;
measured on N(0, 1) [64, 1024, 64], groups of 32 channels, the mean squared error with bfloat16
scales is 1.008x, 1.010x and 1.07x that with float16 at 2, 4 and 8 bits. Its range is checked
(|zero|, scale <= 65504); float16 x within scale / 2 of ±65504 may come back as ±inf.
Arithmetic: codes in float64 (exact roundings of the quotient, the same on every device; transient
float64 copies of x, 8 bytes per element);
x^ in float32 (float64 for float64 input), one more rounding (<= 2^-24 |x^|), then the cast
back to x's dtype.

Partial groups are not stored: `quantize` needs the axis length to be a multiple of g. Along
the token axis the caller quantizes the first g * floor(T / g) tokens and keeps the T mod g
newest in 16 bits (KIVI's residual window) until a group fills.

Packing: codes are packed along the last dim, k = 8 / b codes per byte, code i of a row in
byte i // k at bits b * (i mod k) (low bits first). Each row is packed on its own, so tokens
can be sliced, gathered or appended without unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)
#: dtype of the scales and zeros (2 bytes each per group).
SCALE_DTYPE = torch.float16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized tensor: x^ = zero + code * scale per group of `group_size` along `axis`.

    codes: uint8, x's shape with the last dim packed to shape[-1] * bits / 8.
    scales, zeros: SCALE_DTYPE, x's shape with shape[axis] / group_size along `axis`.
    axis: non-negative; shape, dtype: those of the original tensor.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    axis: int
    shape: torch.Size
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """x^ in the original shape and dtype (computed in float32, or float64 for float64)."""
        work = torch.promote_types(self.dtype, torch.float32)
        codes = unpack(self.codes, self.bits).to(work).unflatten(self.axis, (-1, self.group_size))
        scales = self.scales.to(work).unsqueeze(self.axis + 1)
        zeros = self.zeros.to(work).unsqueeze(self.axis + 1)
        return torch.addcmul(zeros, codes, scales).flatten(self.axis, self.axis + 1).to(self.dtype)

    def nbytes(self) -> int:
        """Every byte held: packed codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def check_bits(bits: int) -> int:
    """Return `bits` if it is a quantized width in BITS, else raise ValueError."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits [..., n] -> uint8 [..., n * bits / 8], 8 / bits codes per byte."""
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() == 0:
        raise ValueError("codes must be a uint8 tensor with at least one dim")
    if codes.shape[-1] % (8 // bits):
        raise ValueError(f"the last dim ({codes.shape[-1]}) must be a multiple of {8 // bits} to pack {bits}-bit codes")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must be < {1 << bits} at {bits} bits, got {int(codes.max())}")
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.contiguous()
    groups = codes.unflatten(-1, (-1, per_byte))
    packed = groups[..., 0].clone()
    for i in range(1, per_byte):
        packed |= groups[..., i] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., m] -> uint8 codes [..., m * 8 / bits]."""
    check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError("packed codes must be a uint8 tensor with at least one dim")
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1) -> QuantizedTensor:
    """Quantize x to `bits` in groups of `group_size` consecutive elements along `axis`.

    axis=-1: groups of channels of one token (values, KIVI); axis=-2 on [..., T, d]: groups of
    tokens of one channel (keys, KIVI). Formulas and error bound in the module docstring.
    """
    check_bits(bits)
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a tensor of dtype {', '.join(map(str, FLOAT_DTYPES))}, "
                         f"got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis must be an int in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D tensor, got {axis!r}")
    axis %= x.dim()
    length = x.shape[axis]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or length % group_size:
        divisors = [k for k in range(1, length + 1) if length % k == 0]
        raise ValueError(f"group_size must divide the length {length} of axis {axis}; allowed: {divisors}, "
                         f"got {group_size!r}")
    if x.shape[-1] * bits % 8:
        raise ValueError(f"the last dim ({x.shape[-1]}) must be a multiple of {8 // bits} to pack {bits}-bit codes")

    levels = (1 << bits) - 1
    grouped = x.unflatten(axis, (length // group_size, group_size)).double()
    zeros = _to_float16(grouped.amin(axis + 1, keepdim=True), up=False)
    scales = _to_float16((grouped.amax(axis + 1, keepdim=True) - zeros.double()) / levels, up=True)
    if not (torch.isfinite(zeros).all() and torch.isfinite(scales).all()):
        raise ValueError(f"x has non-finite values, or a group whose min or step does not fit {SCALE_DTYPE} (±65504)")
    divisor = scales.double().masked_fill_(scales == 0, 1.0)
    codes = grouped.sub_(zeros.double()).div_(divisor).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(
        codes=_pack(codes.flatten(axis, axis + 1), bits),
        scales=scales.squeeze(axis + 1),
        zeros=zeros.squeeze(axis + 1),
        bits=bits,
        group_size=group_size,
        axis=axis,
        shape=x.shape,
        dtype=x.dtype,
    )


def _to_float16(values: torch.Tensor, up: bool) -> torch.Tensor:
    """float64 -> SCALE_DTYPE rounded up (toward +inf) or down (toward -inf)."""
    rounded = values.to(SCALE_DTYPE)
    off = rounded.double() < values if up else rounded.double() > values
    return torch.where(off, torch.nextafter(rounded, torch.full_like(rounded, float("inf") if up else -float("inf"))),
                       rounded)
