"""``torchblocks check``: every block and optimizer against its native twin.

For each entry of ``BLOCKS``, on every available (device, backend) target and
each dtype: parity of the output and of every input gradient over the
block's cases, then ``gradcheck`` and ``gradgradcheck`` in float64. For each entry of
``OPTIMIZERS``: the parameters of a small model after ``TRAJECTORY_STEPS``
steps, against the twin's, for each option set. A new block or optimizer
plugs in by adding one entry; the loops and the table are shared.
"""

import dataclasses
import time
import warnings

import torch

import torchblocks
from torchblocks import backend
from torchblocks.cli import _table
from torchblocks.cli.cases import (BLOCKS, OPTIMIZERS, TRAJECTORY_STEPS, BlockCheck, Case, OptimizerCheck,
                                   half_step_comparison, trajectory_error)
from torchblocks.testing import HALF_DTYPES, parity, tolerance, twin


@dataclasses.dataclass
class Row:
    block: str
    device: str
    backend: str
    dtype: str
    check: str  # "parity", "gradcheck" or "gradgradcheck"
    cases: int
    max_rel_error: float  # against native (float16, bfloat16: against float64); NaN where there is no measure
    status: str  # "PASS" or "FAIL"
    note: str = ""


def run_optimizer(check: OptimizerCheck, device: str, backend_name: str):
    """One row per dtype for one optimizer on one target, each yielded as it is
    done: ``TRAJECTORY_STEPS`` steps in float32/float64, one step in
    float16/bfloat16 (by the twin rule: ``half_step_comparison``)."""
    with torchblocks.use_backend(backend_name):
        for dtype in check.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            half = dtype in HALF_DTYPES
            name, steps = ("one step", 1) if half else ("trajectory", TRAJECTORY_STEPS)
            target = torch.device(device)
            if half:
                comparisons = [half_step_comparison(check, options, target, dtype) for options in check.option_sets]
                errors, passed = [c.error for c in comparisons], [c.ok for c in comparisons]
            else:
                errors = [trajectory_error(check, options, target, dtype) for options in check.option_sets]
                passed = [error <= tolerance(dtype) for error in errors]
            status = "PASS" if all(passed) else "FAIL"
            note = f"{steps} step{'s' if steps > 1 else ''}"
            if status == "FAIL":
                note += "; failed: " + ", ".join(f"{k}={v}" for k, v in check.option_sets[passed.index(False)].items())
            yield Row(check.name, device, backend_name, dtype_name, name, len(errors), max(errors), status, note)


def targets(device: str = "all", backends: str = "all"):
    """The (device, backend) pairs this process can run."""
    found = [("cpu", "reference")]
    if backend.INTERPRETER and backend.TRITON_AVAILABLE:
        found.append(("cpu", "triton"))
    if torch.cuda.is_available():
        found.append(("cuda", "reference"))
        if backend.TRITON_AVAILABLE:
            found.append(("cuda", "triton"))
    return [(d, b) for d, b in found if device in ("all", d) and backends in ("all", b)]


def _differentiable_twins(case: Case):
    return [twin(t, t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in case.inputs]


def _gradcheck(case: Case) -> bool:
    return torch.autograd.gradcheck(case.ours, _differentiable_twins(case), raise_exception=False)


def _gradgradcheck(case: Case) -> bool:
    """Second derivatives, in fast mode (random projections, not every entry):
    the test suite runs the full check."""
    return torch.autograd.gradgradcheck(case.ours, _differentiable_twins(case), raise_exception=False,
                                        fast_mode=True)


def run_block(block: BlockCheck, device: str, backend_name: str):
    """The rows of one block on one target, each yielded as it is done: parity
    per dtype (the inputs handed over exactly as built; float16 and bfloat16
    by the twin rule: ``torchblocks.testing.parity``), then gradcheck and
    gradgradcheck."""
    with torchblocks.use_backend(backend_name):
        for dtype in block.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            cases = block.cases(torch.device(device), dtype)
            reports = [parity(case.ours, case.native, case.inputs) for case in cases]
            failed = [case.label for case, report in zip(cases, reports) if not report.ok]
            yield Row(block.name, device, backend_name, dtype_name, "parity", len(cases),
                      max(report.max_error for report in reports), "FAIL" if failed else "PASS",
                      "failed: " + ", ".join(failed) if failed else "")
        cases = [c for c in block.cases(torch.device(device), torch.float64) if c.gradcheck]
        for name, check in (("gradcheck", _gradcheck), ("gradgradcheck", _gradgradcheck)):
            failed = [c.label for c in cases if not check(c)]
            yield Row(block.name, device, backend_name, "float64", name, len(cases), float("nan"),
                      "FAIL" if failed else "PASS", ", ".join(failed))


# The representative set of ``run(quick=True)``: every block and optimizer,
# in float32 and float64, every optimizer's first two option sets.
QUICK_DTYPES = (torch.float32, torch.float64)
QUICK_OPTION_SETS = 2


def names() -> list:
    """The names ``run`` can select: every block, then every optimizer."""
    return [block.name for block in BLOCKS] + [check.name for check in OPTIMIZERS]


def run(device: str = "all", backends: str = "all", only=None, quick: bool = False, progress=None):
    """Every row for every block and optimizer (or those named in ``only``) on
    every available target.

    Args:
        device, backends: narrow the targets ("all", or one).
        only: names from ``names()``; None for all.
        quick: the representative set (``QUICK_DTYPES``, ``QUICK_OPTION_SETS``)
            instead of every dtype and option set.
        progress: called with one line per row as it is done.

    Example::

        >>> rows = torchblocks.cli.check.run("cpu", "reference", only=["relu"], quick=True)
    """
    found = targets(device, backends)
    chosen = [entry for entry in [*BLOCKS, *OPTIMIZERS] if only is None or entry.name in only]
    rows = []
    with warnings.catch_warnings():
        # the interpreter computes with numpy, which warns on the inf and NaN the cases feed it on purpose
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
        for index, entry in enumerate(chosen):
            if quick:
                entry = dataclasses.replace(entry, dtypes=[d for d in entry.dtypes if d in QUICK_DTYPES])
                if isinstance(entry, OptimizerCheck):
                    entry = dataclasses.replace(entry, option_sets=entry.option_sets[:QUICK_OPTION_SETS])
            for target in found:
                started = time.perf_counter()
                for row in (run_block if isinstance(entry, BlockCheck) else run_optimizer)(entry, *target):
                    rows.append(row)
                    if progress is not None:
                        progress(f"[{index + 1}/{len(chosen)}] {row.block} {row.device}/{row.backend} {row.dtype} "
                                 f"{row.check}: {row.status} ({time.perf_counter() - started:.1f} s)")
                        started = time.perf_counter()
    return rows


def format_table(rows) -> str:
    """The rows as an aligned text table."""
    header = ("block", "device", "backend", "dtype", "check", "cases", "max rel err", "result", "note")
    body = [
        (r.block, r.device, r.backend, r.dtype, r.check, str(r.cases),
         "-" if r.max_rel_error != r.max_rel_error else f"{r.max_rel_error:.2e}", r.status, r.note)
        for r in rows
    ]
    return _table.format_table(header, body)
