"""Comparison against a native twin, shared by ``torchblocks check`` and the
test suite: the one table of tolerances, the twin rule that replaces it for
float16 and bfloat16, the two error measures that must both hold (norm-wise
over the whole tensor, and each row against its own scale, so that no row
hides behind a huge one), and the one parity harness.

``parity`` runs a block and its twin on the inputs exactly as built: each
tensor is handed over as a ``twin`` in fresh memory with the very same sizes,
strides and storage offset (a transposed, sliced, expanded or offset view
stays one), never a ``clone()`` that would make it contiguous. It compares
every output and every input gradient: dtype, shape, the places of NaN and
infinities, and the values, and it reports the worst element or row.

Beside it, what the tests share: memory layouts to build inputs in
(``with_layout``), errors raised like native's (``assert_rejected_like_native``),
``torch.compile`` against eager, host-read and allocation guards, launch
hooks, and a PNG reader for the plots.
"""

import contextlib
import dataclasses
import re
import struct
import zlib
from typing import Callable, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Largest allowed ||actual - expected|| / ||expected||, by dtype; float16 and
# bfloat16 have no fixed bound: they follow the twin rule (``twin_allowance``).
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
}
# float32 matmuls that run in TF32 on a GPU.
TF32_TOLERANCE = 1e-3
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The twin rule's factor (``twin_allowance``) where a test states none; by the design at most 1.5.
TWIN_FACTOR = 1.25
# Which of its non-zero row norms sets a tensor's typical scale (``row_errors``): up to a tenth of its rows
# may be huge without raising it.
TYPICAL_QUANTILE = 0.9


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance for results of ``dtype`` (0 for integers: exact).
    float16 and bfloat16 have none: they follow the twin rule (``compare``
    with ``exact``).

    Example::

        >>> tolerance(torch.float32)
        1e-05
    """
    if dtype in HALF_DTYPES:
        raise ValueError(f"{dtype} follows the twin rule: compare(actual, native, exact=native_in_float64)")
    return TOLERANCES.get(dtype, 0.0)


def twin_allowance(native_error: float, dtype: torch.dtype, elements: int, factor: float = TWIN_FACTOR) -> float:
    """The twin rule's bound on the relative error against the float64
    result of a ``dtype`` (float16 or bfloat16) result of ours with
    ``elements`` entries, given native's own ``dtype`` result's error:

        factor * native_error + u / sqrt(elements),   u = eps(dtype) / 2

    The second term is the slack for which way the roundings land. Two
    results that each round correctly to ``dtype`` (every entry off by up to
    u) see their norm-wise errors differ by about u / sqrt(elements) from
    the luck of the roundings alone: for a scalar loss a whole u, which no
    factor of native's (sometimes luckily tiny) error absorbs; for a result
    of thousands of entries almost nothing, so the factor alone decides
    there. It is tied to the dtype's epsilon, never to native: at most
    0.0039 in bfloat16 and 0.00049 in float16, against the fixed 1e-2 it
    replaced.

    Example::

        >>> twin_allowance(2e-3, torch.bfloat16, elements=10_000)
        0.00253...
    """
    return factor * native_error + torch.finfo(dtype).eps / 2 / max(elements, 1) ** 0.5


def _same_non_finite(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same shape, and NaN and infinities (of the same sign) in the same places."""
    if actual.shape != expected.shape:
        return False
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(expected)
    return torch.equal(finite, torch.isfinite(actual)) and torch.equal(actual[~finite].nan_to_num(),
                                                                        expected[~finite].nan_to_num())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` over the finite entries, in
    float64; ``inf`` when shapes differ or the non-finite entries (NaN, +inf,
    -inf) are not in the same places. An all-zero ``expected`` makes any
    difference infinite.

    Example::

        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        0.0
    """
    if not _same_non_finite(actual, expected):
        return float("inf")
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(expected)
    difference = (actual[finite] - expected[finite]).norm().item()
    if difference == 0.0:
        return 0.0
    return difference / max(expected[finite].norm().item(), torch.finfo(torch.float64).tiny)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as (rows, row length): the last dimension is a row; a 0-D or
    1-D tensor has one element per row."""
    if tensor.dim() < 2:
        return tensor.reshape(-1, 1)
    return tensor.reshape(tensor.shape[:-1].numel(), tensor.shape[-1])


def row_errors(actual: torch.Tensor, expected: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The relative error of each row of ``actual`` against ``expected`` (of
    the same shape), in float64: the last dimension is a row, and a 0-D or
    1-D tensor has one element per row. Row r's error is

        ||a_r - e_r|| / max(||e_r||, typical),   typical = the 90th percentile of the non-zero ||e_r||

    over the entries of ``keep`` (default: where both are finite); the
    scales come from every finite entry of ``expected``.

    Why this measure, beside the norm-wise ``relative_error``: one huge row
    swamps ||e||, so the norm-wise error hides any other row being wrong (a
    per-row loss of 6e38 beside losses of 1 that are off by 5). Divided by
    its own norm, no row can hide behind another. But a correct result's
    rounding error in a row is on the scale of the terms the row was
    computed from, not of the row itself: a row near zero by cancellation
    (a gradient of 1e-12 that should be 0; p - 1 of a confident
    prediction) would fail on its own norm. The floor ``typical`` is that
    scale: a high percentile (``TYPICAL_QUANTILE``), as a result may be
    made of blocks of rows of different scales (GPT-2's fused q, k, v bias
    has gradients of 1e-12, 1e-5 and 1e-3), where an entry of the large
    block that cancels to 1e-6 errs on the large block's scale; not the
    largest, so that up to a tenth of the rows may be huge without raising
    it; of the non-zero rows, so that rows that are exactly zero (ignored
    targets, dead ReLUs) do not lower it.

    Rows, not elements: within a row (a sample's logits or activations)
    entries span orders of magnitude (a softmax probability of 1e-30 beside
    one near 1) with rounding errors on the scale of the row's largest, and
    the row's norm judges each at that scale, as ``relative_error`` does
    for the whole.

    Example::

        >>> losses = torch.tensor([6e38, 1.0, 2.0], dtype=torch.float64)
        >>> row_errors(losses + torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64), losses)  # 5 / max(1, 2)
        tensor([0.0000, 2.5000, 0.0000], dtype=torch.float64)
    """
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(expected)
    keep = finite & torch.isfinite(actual) if keep is None else keep.cpu()
    norms = _as_rows(torch.where(finite, expected, 0.0)).norm(dim=-1)
    nonzero = norms[norms > 0]
    rank = int(TYPICAL_QUANTILE * (nonzero.numel() - 1)) + 1
    typical = nonzero.kthvalue(rank).values.item() if nonzero.numel() else 0.0
    scales = norms.clamp(min=max(typical, torch.finfo(torch.float64).tiny))
    return _as_rows(torch.where(keep, actual - expected, 0.0)).norm(dim=-1) / scales


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor of ours against the twin's, by two checks that must both
    hold: the norm-wise ``error`` (``relative_error``, or inf for a dtype,
    shape or NaN-pattern mismatch) against ``allowed``, and the worst
    row's (``row_errors``: each row against its own scale) ``row_error``
    against ``row_allowed``. ``detail`` says which check failed and where:
    the worst element, or the worst row and its worst element."""

    what: str
    error: float
    allowed: float
    detail: str = ""
    row_error: float = 0.0
    row_allowed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed and self.row_error <= self.row_allowed

    @property
    def excess(self) -> float:
        """How far over (above 1) or under its bound the worse of the two checks is."""
        return max(_excess(self.error, self.allowed), _excess(self.row_error, self.row_allowed))

    def __str__(self) -> str:
        rows = f", worst row {self.row_error:.3g} (allowed {self.row_allowed:.3g})" if self.row_error else ""
        return (f"{self.what}: relative error {self.error:.3g} (allowed {self.allowed:g}){rows}"
                f"{'; ' + self.detail if self.detail else ''}")


def _excess(error: float, allowed: float) -> float:
    if allowed:
        return error / allowed
    return float("inf") if error else 0.0


def compare(actual, expected, what: str = "output", allowed: Optional[float] = None, exact=None,
            factor: float = TWIN_FACTOR) -> Comparison:
    """``actual`` against native's ``expected``: None must meet None, dtypes
    must match, then two checks, both of which must hold:

    - norm-wise: ``relative_error`` within ``allowed`` (by default the
      tolerance of ``expected``'s dtype);
    - row-wise: no row's error (``row_errors``: each row against its own
      scale) above sqrt(R) * ``allowed``, R the number of rows.

    The row bound is the norm-wise bound with all of it spent in one row.
    Were every row of its own scale (the row-balanced tensor, where the
    norm-wise error is the root-mean-square of ``row_errors``), a single
    wrong row would fail the norm-wise check exactly when it fails this
    one: the row check adds no strictness there, so it rejects nothing
    correct that the norm-wise check accepts of a tensor of like rows; it
    only closes the norm-wise check's blind spot, the rows a huge row hides.
    A bound of ``allowed`` on each row would be stricter than the norm-wise
    check: the worst of R rows' rounding errors is well above their mean.

    With ``exact``, native's result in float64 from the same values (needed
    where ``expected`` is float16 or bfloat16), the twin rule instead:
    ``actual`` has NaN and infinities where ``expected`` has them, or where
    ``exact`` rounded to the dtype has them (native overflowed on the way);
    on the entries where ``actual`` and ``exact`` are finite its relative
    error against ``exact`` is at most ``twin_allowance`` of native's own
    (on the entries where native is finite, and never less than that of
    ``exact`` rounded once to the dtype, the closest any result can be).
    The row bound is derived from native's row errors the same way, every
    error measured by ``row_errors`` against ``exact``:

        max_r ours_r <= sqrt(R) * twin_allowance(max(rms(native_r), rms(rounded_r)), dtype, n, factor)
                     =  factor * max(||native_r||, ||rounded_r||) + u * sqrt(R / n)

    where native_r is native's error in row r (whatever native itself
    rounded there), rounded_r that of ``exact`` rounded once to the dtype,
    rms and || || taken over the rows, and n the entries compared. It is
    not twin_allowance of native's error in row r alone: where both round
    on the way, ours and native err by like amounts that land in different
    rows, so ours' worst row is above native's error in that same row about
    half the time, by far more than ``factor`` where a row is short.

    Example::

        >>> compare(torch.ones(3), torch.ones(3)).ok
        True
        >>> x = torch.randn(100, dtype=torch.float64).bfloat16()
        >>> compare(x.exp(), x.exp(), exact=x.double().exp()).ok
        True
        >>> losses = torch.tensor([6e38, 1.0, 2.0], dtype=torch.float64)
        >>> print(compare(losses + torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64), losses))
        output: relative error 8.33e-39 (allowed 1e-10), worst row 2.5 (allowed 1.73e-10); row (1,): 6.0 vs expected 1.0
    """
    if actual is None or expected is None:
        error = 0.0 if actual is None and expected is None else float("inf")
        return Comparison(what, error, 0.0, "" if error == 0 else f"{'ours' if actual is None else 'native'} is None")
    keep = None
    if exact is None:
        allowed = tolerance(expected.dtype) if allowed is None else allowed
        reference, error = expected, relative_error(actual, expected)
    elif actual.shape != expected.shape:
        reference, error, allowed = expected, float("inf"), 0.0
    else:
        reference = exact.detach().to("cpu", torch.float64)
        ideal, native = reference.to(expected.dtype), expected.detach().cpu()
        keep = torch.isfinite(reference) & torch.isfinite(actual.detach().cpu())
        native_keep = torch.isfinite(reference) & torch.isfinite(native)
        native_error = max(relative_error(native[native_keep], reference[native_keep]),
                           relative_error(ideal[keep], reference[keep]))
        allowed = twin_allowance(native_error, expected.dtype, int(keep.sum()), factor)
        error = relative_error(actual.detach().cpu()[keep], reference[keep]) if (
            _same_non_finite(actual, expected) or _same_non_finite(actual, ideal)) else float("inf")
    if actual.dtype != expected.dtype:
        return Comparison(what, float("inf"), allowed, f"dtype {actual.dtype} vs expected {expected.dtype}")
    if error == float("inf"):  # shapes or NaN and infinities differ: the rows are not comparable
        return Comparison(what, error, allowed, _worst_element(actual, reference, expected, exact, None))
    rows = row_errors(actual, reference, keep)
    if not rows.numel():
        return Comparison(what, error, allowed)
    spread = rows.numel() ** 0.5
    if exact is None:
        row_allowed = spread * allowed
    else:
        native_rows = max(row_errors(native, reference, native_keep).norm().item(),
                          row_errors(ideal, reference, keep).norm().item())
        row_allowed = spread * twin_allowance(native_rows / spread, expected.dtype, int(keep.sum()), factor)
    row = int(rows.argmax())
    details = [_worst_element(actual, reference, expected, exact, keep)] if error > allowed else []
    if rows[row] > row_allowed:
        details.append(_worst_element(actual, reference, expected, exact, keep, row))
    return Comparison(what, error, allowed, "; ".join(details), rows[row].item(), row_allowed)


def _worst_element(actual, reference, expected, exact, keep, row: Optional[int] = None) -> str:
    """Where ``actual`` is furthest from ``reference`` (within ``row`` of
    ``_as_rows``, if given), and the values there: what ``Comparison.detail``
    says of a failed check."""
    if actual.shape != reference.shape or not actual.numel():
        return f"shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    gap = (actual.detach().double().cpu() - reference.detach().double().cpu()).abs().nan_to_num(float("inf"))
    gap[actual.detach().cpu().isnan() != reference.detach().cpu().isnan()] = float("inf")
    if keep is not None:
        gap[~keep] = 0.0  # where the float64 result or ours is not finite (the non-finite pattern matched)
    if row is None:
        where = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape))
        text = f"worst at {where}"
    else:
        rows = _as_rows(gap)
        flat = torch.tensor(row * rows.shape[-1] + int(rows[row].argmax()))
        where = tuple(int(i) for i in torch.unravel_index(flat, gap.shape))
        text = f"row {where[:-1]}, worst at {where}" if gap.dim() > 1 else f"row {where}"
    text += f": {actual[where].item()!r} vs expected {reference[where].item()!r}"
    if exact is not None:
        text += f" in float64, native {expected[where].item()!r}"
    return text


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, what: str = "output",
                 exact: Optional[torch.Tensor] = None):
    """Assert ``compare``'s two checks (norm-wise and row-wise) within
    ``tolerance(dtype)``, or with ``exact`` (native's result in float64)
    under the twin rule, with a message that says which check failed, by how
    much, and where. ``dtype`` defaults to ``expected.dtype``.

    Example::

        >>> assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    """
    allowed = None if exact is not None else tolerance(dtype or expected.dtype)
    comparison = compare(actual, expected.to(actual.dtype) if dtype else expected, what, allowed, exact)
    if not comparison.ok:
        raise AssertionError(str(comparison))


def twin(tensor: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """A leaf copy of ``tensor`` in fresh memory with the very same layout:
    sizes, strides and storage offset (gaps, transposes and stride-0
    dimensions kept), so an op meets it exactly as it would meet ``tensor``.

    Example::

        >>> x = torch.randn(4, 6)[1:, ::2].t()
        >>> copy = twin(x)
        >>> copy.stride() == x.stride() and copy.storage_offset() == x.storage_offset()
        True
    """
    storage = tensor.detach().untyped_storage().clone()
    copy = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    copy.set_(storage, tensor.storage_offset(), tensor.shape, tensor.stride())
    torch._C._set_neg(copy, tensor.is_neg())  # a lazy negation (the "negated" layout) kept, on a leaf
    return copy.requires_grad_(requires_grad)


def _as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


@dataclasses.dataclass
class ParityReport:
    """The comparisons of one ``parity`` run: outputs first, then gradients."""

    comparisons: list

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    @property
    def worst(self) -> Comparison:
        """The comparison furthest over (or closest to) its allowance."""
        return max(self.comparisons, key=lambda c: c.excess)

    @property
    def max_error(self) -> float:
        return max(c.error for c in self.comparisons)

    def __str__(self) -> str:
        return "\n".join(str(c) for c in self.comparisons if not c.ok) or "all within tolerance"


def parity(ours: Callable, native: Callable, inputs: Sequence, *, grad_inputs: Optional[Sequence[bool]] = None,
           grad_outputs: Optional[Sequence] = None, allowed: Optional[float] = None, twin_factor: float = TWIN_FACTOR,
           seed: int = 1) -> ParityReport:
    """Run ``ours`` and ``native`` on twins of ``inputs`` and compare.

    Args:
        ours, native: callables taking the inputs positionally.
        inputs: tensors (each handed over as a ``twin``: same layout, fresh
            memory) and other values (handed over as they are).
        grad_inputs: which inputs get gradients; default: the floating-point tensors.
        grad_outputs: the gradient of each output (twinned too, so any layout
            works); default: seeded random values like the native output.
        allowed: one tolerance for everything, instead of each dtype's.
        twin_factor: the twin rule's factor (``twin_allowance``) for
            float16 and bfloat16 results: where an input is float16 or
            bfloat16, ``native`` also runs on the inputs' values in float64
            (with the same gradients of the outputs, widened), and each
            16-bit output and gradient is compared by ``compare`` with that
            float64 result as ``exact``.
        seed: for the default gradients of the outputs.

    Returns:
        A ``ParityReport``: every output, then the gradient of every input
        that requires one (a gradient on one side only is a mismatch).

    Example::

        >>> report = parity(torchblocks.functional.relu, torch.nn.functional.relu, [torch.randn(8, 3).t()])
        >>> report.ok
        True
    """
    if grad_inputs is None:
        grad_inputs = [isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs]

    def twins():
        made = [twin(x, wants) if isinstance(x, torch.Tensor) else x for x, wants in zip(inputs, grad_inputs)]
        for original, copy in zip(inputs, made):
            if isinstance(original, torch.Tensor):
                assert (copy.stride(), copy.storage_offset()) == (original.stride(), original.storage_offset())
        return made

    def widened():
        """The inputs' values in float64, for the twin rule (their layout does not matter there)."""
        return [x.to(torch.float64, copy=True).requires_grad_(wants) if isinstance(x, torch.Tensor) and
                x.is_floating_point() else x for x, wants in zip(inputs, grad_inputs)]

    ours_inputs, native_inputs = twins(), twins()
    ours_outputs, native_outputs = _as_tuple(ours(*ours_inputs)), _as_tuple(native(*native_inputs))
    half = any(isinstance(x, torch.Tensor) and x.dtype in HALF_DTYPES for x in inputs)
    exact_inputs = widened() if half else [None] * len(inputs)
    exact_outputs = _as_tuple(native(*exact_inputs)) if half else [None] * len(native_outputs)

    def check(what, mine, theirs, exact):
        """One comparison: by the twin rule where native's result is float16 or bfloat16."""
        twin_rule = theirs is not None and theirs.dtype in HALF_DTYPES
        return compare(mine, theirs, what, allowed, exact if twin_rule else None, twin_factor)

    comparisons = [check(f"output {i}" if len(native_outputs) > 1 else "output", *results)
                   for i, results in enumerate(zip(ours_outputs, native_outputs, exact_outputs))]
    if len(ours_outputs) != len(native_outputs):
        comparisons.append(Comparison("outputs", float("inf"), 0.0, f"{len(ours_outputs)} vs {len(native_outputs)}"))
    differentiable = [i for i, out in enumerate(native_outputs) if out.requires_grad]
    if differentiable and any(grad_inputs):
        if grad_outputs is None:
            generator = torch.Generator().manual_seed(seed)
            grad_outputs = [torch.randn(native_outputs[i].shape, generator=generator, dtype=torch.float64)
                            .to(native_outputs[i].device, native_outputs[i].dtype) for i in differentiable]
        else:
            grad_outputs = [grad_outputs[i] for i in differentiable]
        for outputs in (ours_outputs, native_outputs):
            if all(outputs[i].requires_grad for i in differentiable):
                torch.autograd.backward([outputs[i] for i in differentiable], [twin(g) for g in grad_outputs])
        if half:  # the same gradients of the outputs, widened
            torch.autograd.backward([exact_outputs[i] for i in differentiable],
                                    [g.to(torch.float64) for g in grad_outputs])
        for index, (a, b, e, wants) in enumerate(zip(ours_inputs, native_inputs, exact_inputs, grad_inputs)):
            if wants:
                comparisons.append(check(f"gradient of input {index}", a.grad, b.grad, e.grad if half else None))
    return ParityReport(comparisons)


def assert_parity(ours: Callable, native: Callable, inputs: Sequence, what: str = "", **options) -> ParityReport:
    """``parity`` that raises AssertionError naming every mismatch and its
    worst element; returns the report when all is within tolerance.

    Example::

        >>> assert_parity(torchblocks.functional.relu, torch.nn.functional.relu, [torch.randn(5)])
    """
    report = parity(ours, native, inputs, **options)
    if not report.ok:
        raise AssertionError(f"{what + ': ' if what else ''}{report}")
    return report


@contextlib.contextmanager
def around_triton_launches(context: Callable[[], contextlib.AbstractContextManager]):
    """Run every Triton kernel launch (``kernel[grid](...)``, of any kernel)
    made in the block inside a fresh ``context()``: a hook for tools that
    count launches or must not see the launch's own work (the interpreter
    copies arguments to host memory).

    Example::

        >>> launches = []
        >>> with around_triton_launches(lambda: contextlib.nullcontext(launches.append(1))):
        ...     torchblocks.functional.relu(x)  # on CUDA, or under TRITON_INTERPRET=1
    """
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # no triton: no launches to wrap
        yield
        return
    launcher = KernelInterface.__getitem__

    def wrapped(self, grid):
        launch = launcher(self, grid)

        def run(*args, **kwargs):
            with context():
                return launch(*args, **kwargs)
        return run

    KernelInterface.__getitem__ = wrapped
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launcher


class HostRead(RuntimeError):
    """A device value was read on the host where none may be."""


class _NoHostReads(TorchFunctionMode):
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS or _copies_to_host(func, args, kwargs):
            raise HostRead(f"{getattr(func, '__name__', func)} reads a tensor's value on the host")
        return func(*args, **kwargs)


def _copies_to_host(func, args, kwargs) -> bool:
    """``tensor.to("cpu")`` (or a torch.device), or ``host.copy_(device_tensor)``."""
    if func is torch.Tensor.to:
        devices = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (str, torch.device))]
        return any(torch.device(device).type == "cpu" for device in devices)
    if func is torch.Tensor.copy_:
        return args[0].device.type == "cpu" and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu"
    return False


@contextlib.contextmanager
def no_host_reads():
    """Raise ``HostRead`` on any read of a tensor's value by the host in the
    block: ``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``,
    ``.numpy()``, ``.cpu()`` or ``.to("cpu")``. On a GPU each is a
    synchronisation and breaks CUDA graph capture; under this guard code can
    be checked free of them on the CPU too. Triton launches are exempt (the
    interpreter reads its arguments; a GPU launch reads nothing).

    Example::

        >>> with no_host_reads():
        ...     optimizer.step()  # capturable=True: no step count read back
    """
    with around_triton_launches(torch._C.DisableTorchFunction), _NoHostReads():
        yield


class InsideBlocksMode(TorchDispatchMode):
    """A dispatch mode that sees the aten ops inside torchblocks' custom ops
    too: a dispatch mode otherwise sees ``torchblocks::<op>`` as one op and
    runs its body with the mode popped. A Triton launch's own work (the
    interpreter's copies of its arguments) stays hidden: a GPU launch has none.
    Subclasses define ``record(func, args, kwargs, output)``, called for every
    other op after it ran."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.startswith("torchblocks::"):
            # the op's device kernel, with this mode active again for its ops
            device = next(t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)).device
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with around_triton_launches(_disable_current_modes), self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        output = func(*args, **kwargs)
        self.record(func, args, kwargs, output)
        return output

    def record(self, func, args, kwargs, output) -> None:
        raise NotImplementedError


def tensors(tree) -> list:
    """The tensors in a nest of tuples, lists and dicts."""
    return [leaf for leaf in torch.utils._pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class Allocations(InsideBlocksMode):
    """Records each aten op run in the block, torchblocks' ops opened up:
    ``ops``, (name, elements of the largest tensor it allocates; 0 for a view
    or an op that allocates nothing), and ``writes``, (name, elements
    written) for each op that writes into its first argument (``copy_``, ``add_``).

    Example::

        >>> with Allocations() as allocations:
        ...     torchblocks.functional.dense_cross_entropy(x, w, labels).backward()
        >>> allocations.largest   # elements: no (N, C) logits when the chunks are smaller
    """

    def __init__(self):
        super().__init__()
        self.ops = []
        self.writes = []

    def record(self, func, args, kwargs, output) -> None:
        name = func._schema.name
        inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        new = [t.numel() for t in tensors(output) if t.untyped_storage().data_ptr() not in inputs]
        self.ops.append((name, 0 if func.is_view else max(new, default=0)))
        first = func._schema.arguments[0] if func._schema.arguments else None
        if first is not None and first.alias_info is not None and first.alias_info.is_write:
            self.writes.append((name, args[0].numel()))

    @property
    def largest(self) -> int:
        return max((size for _, size in self.ops), default=0)


def assert_compiled_matches_eager(module, inputs, reduce=lambda output: output.sum()):
    """``torch.compile(module, fullgraph=True)`` (so any graph break fails)
    gives eager's output and parameter gradients; ``reduce`` turns the output
    into the scalar to differentiate.

    Example::

        >>> assert_compiled_matches_eager(torchblocks.nn.Dense(4, 3), [torch.randn(2, 4)])
    """
    eager = module(*inputs)
    reduce(eager).backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)(*inputs)
    reduce(compiled).backward()
    assert_close(compiled, eager)
    for param, expected in zip(module.parameters(), eager_grads):
        assert_close(param.grad, expected, what="parameter gradient")


LAYOUTS = ["contiguous", "sliced", "transposed", "expanded", "offset", "negated"]


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` in a tensor of the given memory layout:
    contiguous; sliced (every other element of a wider last dimension);
    transposed (dims reversed in memory; for 1-D, a column of a row-major
    matrix); expanded (stride 0 along the last dim: the first value of each
    row, repeated); offset (contiguous from storage offset 5); negated
    (contiguous, memory holding -values under the negative bit of
    ``torch._neg_view``, which reads them back as values).

    Example::

        >>> with_layout(torch.randn(3, 4), "transposed").stride()
        (1, 3)
    """
    shape = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "expanded":
        return values[..., :1].expand(shape)
    if layout == "sliced":
        view = values.new_empty(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "transposed" and values.dim() == 1:
        view = values.new_empty(shape[0], 3)[:, 1]
    elif layout == "transposed":
        view = values.new_empty(shape[::-1]).permute(*reversed(range(values.dim())))
    elif layout == "offset":
        view = values.new_empty(values.numel() + 5)[5:].view(shape)
    elif layout == "negated":
        view = torch._neg_view(values.new_empty(shape))
    else:
        raise ValueError(f"with_layout: layout must be one of {LAYOUTS}, got {layout!r}")
    return view.copy_(values)


def _raised(call: Callable) -> Optional[Exception]:
    try:
        call()
    except Exception as error:  # noqa: BLE001  (returned: the caller says what was expected)
        return error
    return None


def assert_rejected_like_native(ours: Callable, native: Callable, message: str) -> None:
    """``native()`` raises; ``ours()`` raises an exception of exactly native's
    type, with ``message`` in it (which names the argument and what was
    expected). The type is native's in this run, not a literal: when a torch
    release changes it, the test checks that torchblocks followed.

    Example::

        >>> assert_rejected_like_native(lambda: tb.relu(x, inplace=1), lambda: F.relu(x, inplace=1),
        ...                             "inplace must be a bool")
    """
    native_error, our_error = _raised(native), _raised(ours)
    assert native_error is not None, "native raised nothing: it takes this input, so must we"
    assert type(our_error) is type(native_error), f"ours raised {our_error!r}; native raised {native_error!r}"
    assert re.search(re.escape(message), str(our_error)), f"ours raised {our_error!r}; expected {message!r} in it"


def read_png(path) -> tuple:
    """(width, height) of a PNG file, after checking its signature and every
    chunk's CRC.

    Example::

        >>> read_png("benchmarks/results/cpu-x86-64-2-threads/relu.png")
    """
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks = 8, []
    while offset < len(blob):
        (length,) = struct.unpack(">I", blob[offset:offset + 4])
        kind, body = blob[offset + 4:offset + 8], blob[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", blob[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append(kind)
        offset += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return struct.unpack(">II", blob[16:24])
