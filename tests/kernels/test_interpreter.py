"""bfloat16 under the Triton interpreter (kernels/_interpreter.py): tiny
kernels of their own, element by element against torch's bfloat16 CPU ops,
which compute in float32 and round to nearest even, as a GPU does. And the
language patched once per launch, however many helpers a kernel calls."""

import numpy as np
import pytest
import torch

from conftest import NO_INTERPRETER, NO_TRITON

pytestmark = [pytest.mark.triton, NO_TRITON, NO_INTERPRETER]
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from torchblocks.kernels import _launch  # noqa: E402,F401  (under the interpreter, installs the layer)


def test_the_launchers_install_it():
    from triton.runtime import interpreter

    assert interpreter.InterpreterBuilder.computes_bfloat16


@triton.jit
def _add_one(x):
    return x + 1


@triton.jit
def _helpers_in_a_loop(x_ptr, y_ptr, BLOCK: tl.constexpr, CALLS: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    for _ in tl.static_range(CALLS):
        x = _add_one(x)
    tl.store(y_ptr + offsets, x)


def test_the_language_is_patched_once_per_launch_and_restored_after(monkeypatch):
    """Every call of a helper re-patched all of triton.language before
    (``install_patch_once``): here 20 helper calls in each of 3 programs
    patch it as often as one launch does, the helpers still compute, and
    after the grid the language is the compiler's again."""
    from triton.runtime import interpreter

    assert interpreter._patch_lang.once_per_launch
    patchings = []
    patch_builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *args: patchings.append(args[0]) or patch_builtin(*args))
    original_load = tl.load
    x = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    y = torch.empty_like(x)
    _helpers_in_a_loop[(1,)](x, y, BLOCK=8, CALLS=1)
    one_launch = len(patchings)
    patchings.clear()
    for row in range(3):
        _helpers_in_a_loop[(1,)](x[row], y[row], BLOCK=8, CALLS=20)
    assert len(patchings) == 3 * one_launch
    assert torch.equal(y, x + 20)
    assert tl.load is original_load


def every_bfloat16() -> torch.Tensor:
    """All 65536 bit patterns: zeros of both signs, denormals, normals,
    infinities, quiet and signalling NaNs of either sign."""
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.dtype == expected.dtype and torch.equal(actual.view(torch.int16), expected.view(torch.int16))


def same_values(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same dtype and values, NaN where NaN, and the sign of every zero."""
    equal = (actual == expected) & (actual.signbit() == expected.signbit())
    return actual.dtype == expected.dtype and bool((equal | (actual.isnan() & expected.isnan())).all())


@triton.jit
def _convert(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = x converted to y's dtype (a plain copy when the dtypes match)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def convert(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    _convert[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def test_load_and_store_copy_every_bit_pattern():
    """A load and a store move bits: NaN payloads, infinities, denormals and
    -0.0 come out as they went in."""
    x = every_bfloat16()
    assert same_bits(convert(x, torch.bfloat16), x)


def test_casts_to_and_from_float32():
    """bf16 -> float32 is exact; float32 -> bf16 rounds to nearest even, as
    torch does: on random bit patterns, every tie between two bf16, and the
    edges (the largest float32 and values just under and at the overflow
    midpoint, denormal ties, NaNs whose payload sits in the dropped half)."""
    x = every_bfloat16()
    assert same_values(convert(x, torch.float32), x.float())
    random = torch.randint(-2**31, 2**31, (1 << 16,), generator=torch.Generator().manual_seed(0))
    ties = x.float().view(torch.int32).to(torch.int64) | 0x8000
    edges = torch.tensor([0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x00008000, 0x00018000, 0x7F800001, 0xFF800001,
                          0x80000001, 0x3F808000, 0x3F818000])
    y = torch.cat([random, ties, edges]).to(torch.int32).view(torch.float32)
    assert same_values(convert(y, torch.bfloat16), y.bfloat16())


def test_casts_from_float64_round_once():
    """float64 -> bf16 rounds the float64 value itself to nearest even (the
    GPU's cvt.rn.bf16.f64, or LLVM's round-to-odd expansion of it): a value a
    hair above or below the midpoint of two bf16 goes to the nearer one, where
    going through float32 first (as torch does) lands on the midpoint and
    rounds to even."""
    low = torch.arange(0, 0x7F7F, 7, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    high = (low.view(torch.int16) + 1).view(torch.bfloat16)
    midpoint = (low.double() + high.double()) / 2
    above, below = (torch.from_numpy(np.nextafter(midpoint.numpy(), side)) for side in (np.inf, -np.inf))
    for values, expected in ((above, high), (below, low), (-above, -high)):
        assert same_values(convert(values, torch.bfloat16), expected)
    assert not same_values(above.bfloat16(), high)  # torch's double rounding, which this test rules out
    random = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e3
    assert same_values(convert(random, torch.bfloat16), random.bfloat16())


def test_casts_between_bfloat16_float16_and_integers():
    x = every_bfloat16()
    assert same_values(convert(x, torch.float16), x.half())
    h = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert same_values(convert(h, torch.bfloat16), h.bfloat16())
    ints = torch.tensor([0, 1, -1, 255, 257, -257, 65535, 2**24 + 1, -(2**31)], dtype=torch.int32)
    assert same_values(convert(ints, torch.bfloat16), ints.bfloat16())


@triton.jit
def _arithmetic(x_ptr, y_ptr, out_ptr, wide_ptr, n, BLOCK: tl.constexpr):
    """out[k] (k = 0..7, each (n,)), bf16: x + y, x - y, x * y, x / y,
    (x + y) + y, max(x, y) (NaN wins, as in torch.maximum), exp(x), log(x)
    of bf16 x and y; wide[0..1] (float32): exp(x), log(x), which take
    float32 only, so x is widened first."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    wide = (tl.exp(x.to(tl.float32)), tl.log(x.to(tl.float32)))
    results = (x + y, x - y, x * y, x / y, x + y + y, tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL), wide[0],
               wide[1])
    for k in tl.static_range(8):
        tl.store(out_ptr + k * n + offsets, results[k].to(tl.bfloat16), mask=mask)
    for k in tl.static_range(2):
        tl.store(wide_ptr + k * n + offsets, wide[k], mask=mask)


def test_arithmetic_matches_torch_element_by_element():
    """Each result is the float32 result rounded to nearest even, as torch's
    bfloat16 ops give it (a sum of a sum rounded twice): on random operands
    and on the values integer arithmetic on the bits gets wrong (negatives,
    zeros of both signs, infinities, NaN, denormals, the edge of overflow),
    each against each. exp and log: their float32 results (numpy's, within 2
    units in the last place of torch's) rounded as torch rounds them."""
    generator = torch.Generator().manual_seed(2)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-39, 3e38])
    x = torch.cat([torch.randn(2000, generator=generator) * 4, special.repeat_interleave(10)]).bfloat16()
    y = torch.cat([torch.randn(2000, generator=generator) * 4, special.repeat(10)]).bfloat16()
    out, wide = torch.empty(8, x.numel(), dtype=torch.bfloat16), torch.empty(2, x.numel())
    _arithmetic[(triton.cdiv(x.numel(), 512),)](x, y, out, wide, x.numel(), BLOCK=512)
    expected = [x + y, x - y, x * y, x / y, x + y + y, torch.maximum(x, y), wide[0].bfloat16(), wide[1].bfloat16()]
    for name, ours, native in zip(["add", "sub", "mul", "div", "add twice", "maximum", "exp", "log"], out, expected):
        assert same_values(ours, native), name
    for ours, native in zip(wide, [x.float().exp(), x.float().log()]):
        assert torch.allclose(ours, native, rtol=2**-22, atol=0, equal_nan=True)


@triton.jit
def _dot(a_ptr, b_ptr, c_ptr, rounded_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """c = a @ b (a (M, K), b (K, N), bf16) in a float32 accumulator; rounded = c as bf16."""
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    c = tl.dot(tl.load(a_ptr + m[:, None] * K + k[None, :]), tl.load(b_ptr + k[:, None] * N + n[None, :]))
    tl.store(c_ptr + m[:, None] * N + n[None, :], c)
    tl.store(rounded_ptr + m[:, None] * N + n[None, :], c.to(tl.bfloat16))


def dot(a, b):
    c = torch.empty(a.shape[0], b.shape[1])
    rounded = torch.empty(c.shape, dtype=torch.bfloat16)
    _dot[(1,)](a, b, c, rounded, M=a.shape[0], N=b.shape[1], K=a.shape[1])
    return c, rounded


def test_dot_accumulates_exact_products_in_float32():
    """A bf16 x bf16 dot is the float32 matmul of the bf16 values (exact
    products in a float32 accumulator, as tensor cores form them): on
    multiples of 1/8 every partial sum is exact too, so it equals torch.mm of
    the widened inputs bit for bit; on random values it agrees to float32's
    precision. Its bf16 cast rounds once, at the end."""
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randint(-32, 33, shape, generator=generator).div(8).bfloat16() for shape in [(16, 32), (32, 16)])
    c, rounded = dot(a, b)
    assert torch.equal(c, torch.mm(a.float(), b.float())) and same_values(rounded, c.bfloat16())
    a, b = torch.randn(16, 32, generator=generator).bfloat16(), torch.randn(32, 16, generator=generator).bfloat16()
    c, rounded = dot(a, b)
    assert torch.allclose(c, torch.mm(a.float(), b.float()), rtol=1e-6, atol=1e-6)
    assert same_values(rounded, c.bfloat16())


@triton.jit
def _reduce(x_ptr, sum_ptr, wide_sum_ptr, max_ptr, N: tl.constexpr):
    """Per row of x (rows, N), bf16: the sum in bf16, the sum in float32, the max."""
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * N + tl.arange(0, N))
    tl.store(sum_ptr + row, tl.sum(x, axis=0))
    tl.store(wide_sum_ptr + row, tl.sum(x.to(tl.float32), axis=0))
    tl.store(max_ptr + row, tl.max(x, axis=0))


def reduce_rows(x):
    """(bf16 sums, float32 sums, maxima) of the rows of x."""
    sums, maxima = torch.empty(x.shape[0], dtype=torch.bfloat16), torch.empty(x.shape[0], dtype=torch.bfloat16)
    wide = torch.empty(x.shape[0])
    _reduce[(x.shape[0],)](x, sums, wide, maxima, N=x.shape[1])
    return sums, wide, maxima


def test_sum_and_max_reductions():
    """Sums of integers whose partial sums are all exact in bf16 equal torch's
    in any order; a float32 sum of bf16 values equals torch's float32 sum;
    the max equals torch's, rows of negatives included."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (8, 64), generator=generator).bfloat16()  # |partial sums| <= 192: exact
    x[1] = -x[1].abs() - 1
    sums, _, maxima = reduce_rows(x)
    assert same_values(sums, x.sum(dim=1)) and same_values(maxima, x.amax(dim=1))
    y = torch.randn(8, 64, generator=generator).bfloat16()
    assert torch.allclose(reduce_rows(y)[1], y.float().sum(dim=1), rtol=1e-6, atol=1e-6)


def test_a_bfloat16_sum_rounds_every_addition():
    """tl.sum of bf16 adds in bf16, as a GPU's reduction does: 1 + 2^-8 is a
    tie that rounds to 1, so [1, 2^-8, 2^-8, 0] sums to 1 in every order that
    adds a 2^-8 to the 1 alone, where a float32 accumulator (and torch's
    bfloat16 sum) gives 1 + 2^-7."""
    x = torch.tensor([[1.0, 2**-8, 2**-8, 0.0]], dtype=torch.bfloat16)
    sums, wide, _ = reduce_rows(x)
    assert sums.item() == 1.0 and x.sum().item() == wide.item() == 1 + 2**-7


@triton.jit
def _atomic_add(target_ptr, index_ptr, value_ptr, old_ptr, n, BLOCK: tl.constexpr):
    """target[index[i]] += value[i] atomically for the first n lanes; old[i]: what lane i found."""
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    old = tl.atomic_add(target_ptr + tl.load(index_ptr + offsets, mask=mask), tl.load(value_ptr + offsets, mask=mask),
                        mask=mask)
    tl.store(old_ptr + offsets, old, mask=mask)


def test_atomic_add_rounds_each_addition():
    """Each atomic add rounds to bf16: four adds of 2^-8 onto 1.0 each tie
    back to 1.0 (one float32 sum would give 1 + 2^-6), and 7 + 1000 gives
    1008 (the spacing there is 8). A lane past the mask adds nothing; each
    lane returns what its address held."""
    target = torch.tensor([1.0, -3.0, 0.5, 7.0], dtype=torch.bfloat16)
    index = torch.tensor([0, 0, 0, 0, 1, 2, 3, 3], dtype=torch.int32)
    value = torch.tensor([2**-8] * 4 + [0.25, -0.5, 1000.0, 1000.0], dtype=torch.bfloat16)
    old = torch.full((8,), 9.0, dtype=torch.bfloat16)
    _atomic_add[(1,)](target, index, value, old, 7, BLOCK=8)
    assert target.tolist() == [1.0, -2.75, 0.0, 1008.0]
    assert old.tolist() == [1.0, 1.0, 1.0, 1.0, -3.0, 0.5, 7.0, 9.0]


@triton.jit
def _bits(x_ptr, cmp_ptr, new_ptr, bits_ptr, abs_ptr, old_ptr, BLOCK: tl.constexpr):
    """bits = x's 16 bits as int16; abs = |x|; x = bits bitcast back;
    old = atomic_cas(x, cmp, new)."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(bits_ptr + offsets, x.to(tl.int16, bitcast=True))
    tl.store(abs_ptr + offsets, tl.abs(x))
    tl.store(x_ptr + offsets, tl.load(bits_ptr + offsets).to(tl.bfloat16, bitcast=True))
    tl.store(old_ptr + offsets, tl.atomic_cas(x_ptr + offsets, tl.load(cmp_ptr + offsets), tl.load(new_ptr + offsets)))


def test_bitcast_abs_and_compare_and_swap_see_the_bits():
    """A bitcast to int16 and back gives the bf16 bits; abs clears the sign
    bit; compare-and-swap compares bits (-0.0 does not match 0.0) and
    returns what it found."""
    x = torch.tensor([1.5, -0.0, -2.0, float("nan")], dtype=torch.bfloat16)
    cmp = torch.tensor([1.5, 0.0, -2.0, 0.0], dtype=torch.bfloat16)
    new = torch.tensor([-7.0, 5.0, 3.0, 1.0], dtype=torch.bfloat16)
    expected_bits, expected_abs, original = x.view(torch.int16).clone(), x.abs(), x.clone()
    bits, absolute, old = torch.empty_like(expected_bits), torch.empty_like(x), torch.empty_like(x)
    _bits[(1,)](x, cmp, new, bits, absolute, old, BLOCK=4)
    assert torch.equal(bits, expected_bits) and same_values(absolute, expected_abs) and same_bits(old, original)
    assert same_values(x, torch.tensor([-7.0, -0.0, 3.0, float("nan")], dtype=torch.bfloat16))


def test_what_is_not_emulated_raises():
    """bf16 <-> fp8 conversions are not emulated: they raise, never compute wrongly."""
    with pytest.raises(Exception, match="fp8"):
        convert(torch.ones(4, dtype=torch.bfloat16), torch.float8_e5m2)
