"""The error bound of a bfloat16 or float16 result of the ops, against a float64 reference
computed from the same rounded inputs (tests/test_ops_reduced_precision.py, tests/test_fuzz_ops.py).

Each element may be off by one rounding of the result to the dtype (two where torch adds the
bias after rounding its GEMM: a term `extra` rounded on its own), plus float32 accumulation over
the reduction, relative to the sum of the magnitudes of its terms (the same op on |inputs|): the
bound grows with each element's own scale and with the reduction length.
"""

from __future__ import annotations

import math

import torch

# Unit roundoff: half the distance from 1 to the next value.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOAT32_ROUNDOFF = 2.0**-24


def bound(reference, magnitude, reduction: int, dtype, extra=None):
    """Elementwise |error| allowed: 2u|reference| + u|extra| + 2 n 2^-24 magnitude, and half the
    spacing of the dtype's denormals (float16's reach 6e-5: a rounding there is absolute)."""
    u = UNIT_ROUNDOFF[dtype]
    denormal_rounding = u * torch.finfo(dtype).smallest_normal
    allowed = 2 * u * reference.abs() + 2 * reduction * FLOAT32_ROUNDOFF * magnitude + denormal_rounding
    return allowed if extra is None else allowed + u * extra.abs()


def assert_within_bound(actual, reference, magnitude, reduction: int, dtype, extra=None, what=""):
    """actual (of `dtype`) is within bound() of the float64 reference, element by element; NaN and
    infinities where the reference has them (the ops propagate them as torch does), and an infinity
    of the reference's sign where the reference lies past the dtype's largest value (float16 tops
    out at 65504; within a rounding of that edge either is right)."""
    assert actual.dtype == dtype, (what, actual.dtype)
    assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
    largest = torch.finfo(dtype).max
    overflow = reference.abs() >= largest * (1 + 2 * UNIT_ROUNDOFF[dtype])
    edge = (reference.abs() > largest) & ~overflow
    reference = torch.where(overflow, reference.sign() * math.inf, reference)
    assert torch.equal(actual.isnan(), reference.isnan()), f"{what}: NaN in other places than the reference's"
    assert torch.equal((actual.isinf() & ~edge), (reference.isinf() & ~edge)), f"{what}: infinities differ"
    assert torch.equal(actual[reference.isinf()], reference[reference.isinf()].to(dtype)), f"{what}: infinity signs"
    check = reference.isfinite() & ~edge
    allowed = bound(reference, magnitude, reduction, dtype, extra)
    error = (actual.double() - reference).abs()
    if not bool((error[check] <= allowed[check]).all()):
        excess = torch.where(check, error - allowed, torch.zeros_like(error))
        worst = excess.argmax()
        raise AssertionError(
            f"{what}: error {error.flatten()[worst].item():.3g} over bound {allowed.flatten()[worst].item():.3g} "
            f"(reference {reference.flatten()[worst].item():.4g})"
        )


def reduced_tensor(shape, dtype, scale=1.0, generator=None):
    """Random values exactly representable in `dtype`, and their float64 copy."""
    values = (torch.randn(shape, generator=generator) * scale).to(dtype)
    return values, values.double()
