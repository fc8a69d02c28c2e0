"""Packed low-bit storage: pack/unpack, the documented error bound, and a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obcache.quantization import BITS, SCALE_DTYPE, pack, quantize, unpack

F16 = np.float16


def reference(x: np.ndarray, bits: int, group_size: int, axis: int):
    """The documented quantizer written out in float64 numpy, one group at a time.

    Returns (codes, scales, zeros, x^) with codes unpacked, scales/zeros as float16 arrays of
    x's shape with the axis shortened by group_size, and x^ in float32.
    """
    levels = 2**bits - 1
    moved = np.moveaxis(x.astype(np.float64), axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    codes = np.zeros(rows.shape, dtype=np.uint8)
    restored = np.zeros(rows.shape, dtype=np.float64)
    scales = np.zeros((rows.shape[0], rows.shape[1] // group_size), dtype=F16)
    zeros = np.zeros_like(scales)
    for r in range(rows.shape[0]):
        for g in range(rows.shape[1] // group_size):
            values = rows[r, g * group_size:(g + 1) * group_size]
            zero = F16(values.min())
            if float(zero) > values.min():
                zero = np.nextafter(zero, F16(-np.inf))
            exact = (values.max() - float(zero)) / levels
            scale = F16(exact)
            if float(scale) < exact:
                scale = np.nextafter(scale, F16(np.inf))
            for e, value in enumerate(values):
                code = 0 if scale == 0 else min(max(np.rint((value - float(zero)) / float(scale)), 0), levels)
                codes[r, g * group_size + e] = code
                restored[r, g * group_size + e] = float(zero) + code * float(scale)
            scales[r, g], zeros[r, g] = scale, zero

    def back(a):
        return np.moveaxis(a.reshape(*moved.shape[:-1], a.shape[-1]), -1, axis)

    return back(codes), back(scales), back(zeros), back(restored.astype(np.float32))


def spacing16(y: torch.Tensor) -> torch.Tensor:
    """float16 spacing at |y| (2^-24 in the subnormal range)."""
    y = y.double().abs()
    exponent = torch.floor(torch.log2(y.clamp_min(2.0**-14)))
    return torch.exp2(exponent - 10)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_are_inverse_on_random_codes(bits):
    generator = torch.Generator().manual_seed(bits)
    for shape in [(8,), (3, 16), (2, 5, 64), (1, 1, 4, 24)]:
        codes = torch.randint(0, 2**bits, shape, generator=generator, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] * bits // 8)
        assert torch.equal(unpack(packed, bits), codes)
        everything = torch.arange(256, dtype=torch.uint8).view(-1, 1).expand(-1, 4).contiguous()
        assert torch.equal(pack(unpack(everything, bits), bits), everything)  # every byte value


def test_pack_layout_by_hand():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 255]]
    assert pack(torch.tensor([[5, 12]], dtype=torch.uint8), 4).tolist() == [[5 | 12 << 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis,group_size", [(-1, 8), (-1, 16), (-2, 4), (1, 3)])
def test_quantize_equals_the_float64_reference(dtype, bits, axis, group_size):
    generator = torch.Generator().manual_seed(bits * 10 + group_size)
    x = (torch.randn(2, 12, 16, generator=generator) * torch.rand(2, 12, 1, generator=generator) * 4 + 0.3).to(dtype)
    q = quantize(x, bits, group_size, axis)
    codes, scales, zeros, restored = reference(x.float().numpy(), bits, group_size, axis)
    assert np.array_equal(unpack(q.codes, bits).numpy(), codes)
    assert q.scales.dtype == q.zeros.dtype == SCALE_DTYPE
    assert np.array_equal(q.scales.numpy(), scales) and np.array_equal(q.zeros.numpy(), zeros)
    out = q.dequantize()
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, torch.from_numpy(restored).to(dtype))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("magnitude,offset", [(1.0, 0.0), (1e-5, 0.0), (300.0, 1000.0), (1e-3, -2.0)])
def test_round_trip_error_is_at_most_half_the_stored_scale(bits, axis, magnitude, offset):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 64, 32, generator=generator) * magnitude + offset
    q = quantize(x, bits, 16, axis)
    grouped = x.double().unflatten(q.axis, (-1, 16))
    low, high = grouped.amin(q.axis + 1), grouped.amax(q.axis + 1)
    scale = q.scales.double()
    # the documented bound on the stored scale: the exact step widened by two float16 spacings
    assert (scale <= (high - low + spacing16(low)) / (2**bits - 1) + spacing16(scale)).all()
    assert (scale >= (high - low) / (2**bits - 1)).all()
    error = (x.double() - q.dequantize().double()).abs()
    half = q.scales.double().repeat_interleave(16, dim=q.axis) / 2
    assert (error <= half + 2.0**-24 * x.double().abs()).all()  # + the float32 rounding of x^


def test_constant_and_extreme_groups():
    exact = torch.tensor([[0.5] * 8, [-3.0] * 8, [0.0] * 8, [65504.0] * 8, [-65504.0] * 8])
    widest = torch.tensor([[65504.0, -65504.0] * 4])
    for bits in BITS:
        q = quantize(exact, bits, 8)
        assert torch.equal(q.dequantize(), exact) and q.scales.eq(0).all()
        q = quantize(widest, bits, 8)
        assert ((q.dequantize() - widest).abs() <= q.scales.float() / 2).all()
    inexact = torch.full((1, 8), 0.1)  # not a float16 value: the zero rounds down, the scale covers the gap
    q = quantize(inexact, 2, 8)
    assert q.zeros.item() <= 0.1 and 0 < q.scales.item() < 1e-4
    assert (q.dequantize() - inexact).abs().max() <= q.scales.double().item() / 2
    ramp = torch.linspace(-7.0, 9.0, 64).view(1, 64)  # min and max of each group come back to within scale/2
    q = quantize(ramp, 2, 16)
    groups = q.dequantize().view(4, 16)
    assert ((groups[:, 0] - ramp.view(4, 16)[:, 0]).abs() <= q.scales[0].float() / 2).all()
    assert ((groups[:, -1] - ramp.view(4, 16)[:, -1]).abs() <= q.scales[0].float() / 2).all()


def test_rounding_is_half_to_even_and_deterministic():
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 3.0]])  # scale 1, zero 0: ties at .5
    q = quantize(x, 2, 8)
    assert q.scales.item() == 1.0 and q.zeros.item() == 0.0
    assert unpack(q.codes, 2).tolist() == [[0, 0, 2, 2, 3, 1, 2, 3]]
    y = torch.randn(4, 32, 64)
    first, second = quantize(y, 4, 32), quantize(y, 4, 32)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scales, second.scales)
    alone = quantize(y[1:2], 4, 32)  # per-token groups: a slice quantizes as the slice of the whole
    assert torch.equal(alone.codes, first.codes[1:2]) and torch.equal(alone.zeros, first.zeros[1:2])


@pytest.mark.parametrize("bits", BITS)
def test_nbytes_counts_codes_scales_and_zeros(bits):
    x = torch.randn(2, 4, 128, 64)
    for axis, groups in [(-1, 2 * 4 * 128 * 2), (-2, 2 * 4 * 4 * 64)]:
        q = quantize(x, bits, 32, axis)
        assert q.nbytes() == x.numel() * bits // 8 + 2 * 2 * groups
        assert q.codes.numel() == x.numel() * bits // 8 and q.scales.numel() == q.zeros.numel() == groups


def test_bad_input_is_refused_with_clear_errors():
    x = torch.randn(2, 12, 64)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quantize(x, 3, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(x, 16, 8)
    with pytest.raises(ValueError, match=r"divide the length 64 of axis 2; allowed: \[1, 2, 4, 8, 16, 32, 64\], got 5"):
        quantize(x, 4, 5)
    with pytest.raises(ValueError, match="divide the length 12 of axis 1"):
        quantize(x, 4, 8, axis=1)  # a partial token group: the residual window stays in 16 bits
    with pytest.raises(ValueError, match="got 0"):
        quantize(x, 4, 0)
    with pytest.raises(ValueError, match="dtype"):
        quantize(torch.ones(4, 8, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.ones(0, 8), 4, 8)
    with pytest.raises(ValueError, match="axis must be"):
        quantize(x, 4, 8, axis=3)
    with pytest.raises(ValueError, match="multiple of 4 to pack 2-bit"):
        quantize(torch.randn(4, 6), 2, 3)
    with pytest.raises(ValueError, match="non-finite values, or a group whose min or step"):
        quantize(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        quantize(torch.tensor([[-1e5, 0.0]]), 8, 2)
    with pytest.raises(ValueError, match="codes must be < 4 at 2 bits"):
        pack(torch.tensor([[4, 0, 0, 0]], dtype=torch.uint8), 2)
