"""``torchblocks bench``: every block against its native twin and ``torch.compile``
of the twin, in one process, on one device.

Each block module (``relu``, ``dense``, ``cross_entropy``,
``dense_cross_entropy``, ``optim``, ``training_step``: the book's whole
step, and ``patched``: whole models after ``torchblocks.patch``) yields ``harness.Case``s; ``run`` checks
every provider's output against the twin's once, times it, and writes per
block a table (stdout), a CSV and a PNG plot, plus ``summary.md``.

Example::

    >>> rows = torchblocks.cli.bench.run(["relu"], "cuda", [torch.bfloat16], quick=True, out_dir="bench-out")
"""

import csv
import dataclasses
import itertools
import logging
import os
import sys
import textwrap
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import torch

from torchblocks.cli import _plot, _table
from torchblocks.cli.bench import (cross_entropy, dense, dense_cross_entropy, harness, optim, patched, relu, step,
                               training_step)
from torchblocks.cli.bench.harness import Row

__all__ = ["BLOCKS", "block_table", "bytes_table", "run"]

BLOCKS = {
    "relu": relu.cases,
    "dense": dense.cases,
    "cross_entropy": cross_entropy.cases,
    "dense_cross_entropy": dense_cross_entropy.cases,
    "optim": optim.cases,
    "training_step": training_step.cases,
    "patched": patched.cases,
}


def _profiler_notes(record: logging.LogRecord) -> bool:
    """A logging filter: False for Dynamo's "Profiler record function ... will be ignored"."""
    return "Profiler record function" not in record.getMessage()


def _number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def timed(block: str) -> str:
    """What one timed call of ``block`` is."""
    if block == "training_step":
        return "one training step: forward + backward, RMSprop"
    return "one step over every tensor" if block == "optim" else "forward + backward"


def _speed(ratio: float) -> str:
    """X's time over torchblocks': "1.25x faster" (torchblocks takes less time) or "0.80x slower"."""
    return f"{ratio:.2f}x {'faster' if ratio >= 1 else 'slower'}"


def _reference(rows: List[Row]) -> str:
    """What "of peak" compares with: "matmul" for TFLOP/s, else "copy"."""
    return "matmul" if rows[0].unit == "TFLOP/s" else "copy"


def caption(block: str, rows: List[Row]) -> str:
    """The lines above a block's table: what is timed, and how to read it."""
    against = ("a native matmul timed in this run" if _reference(rows) == "matmul"
               else "a large copy timed in this run (cases that fit in cache can pass it)")
    return (f"{block}: median ms of {timed(block)}; \"vs X\": torchblocks' speed against X;\n"
            f"{rows[0].unit}: torchblocks' throughput; \"of {_reference(rows)}\": against {against}")


def block_table(rows: List[Row]) -> Tuple[Tuple[str, ...], List[Tuple[str, ...]]]:
    """One block's rows as ``(header, body)``: one line per case and dtype,
    torchblocks' and native's times, torchblocks' speed against every other
    provider ("1.25x faster" / "0.80x slower"), its throughput, peak memory
    where it was measured (CUDA), and whether every output matched. The CSV
    keeps every provider's every number.

    Example::

        >>> header, body = block_table(harness.measure(case, "cpu", torch.float32, peak=10.0))
    """
    providers = list(dict.fromkeys(row.provider for row in rows))
    others = [name for name in providers if name != "torchblocks"]
    memory = [name for name in ("torchblocks", "native") if any(
        row.provider == name and row.peak_mb is not None for row in rows)]
    header = ("case", "dtype", "torchblocks ms", "native ms", *(f"vs {name}" for name in others), rows[0].unit,
              f"of {_reference(rows)}", *(f"{name} MiB" for name in memory), "matched")
    body = []
    for key in dict.fromkeys((row.case, row.dtype) for row in rows):
        by_provider = {row.provider: row for row in rows if (row.case, row.dtype) == key}
        ours = by_provider["torchblocks"]
        body.append((*key, _number(ours.ms, 4), _number(by_provider["native"].ms, 4),
                     *(_speed(by_provider[p].ms / ours.ms) if p in by_provider else "-" for p in others),
                     _number(ours.achieved), f"{ours.of_peak:.0%}",
                     *(_number(by_provider[p].peak_mb) for p in memory),
                     "yes" if all(row.matched for row in by_provider.values()) else "NO"))
    return header, body


BYTES_CAPTION = ("bytes: the fewest one call must move (min), and what torchblocks' Triton kernels move by "
                 "construction (ours);\nGB/s: torchblocks' time against each")


def bytes_table(rows: List[Row]) -> Tuple[Tuple[str, ...], List[Tuple[str, ...]]]:
    """The bytes model of one block's cases as ``(header, body)``: per case
    and dtype the minimum bytes and the bytes of torchblocks' design (MB),
    their ratio, and torchblocks' achieved bandwidth against each: how near
    the memory's speed the kernels run, and how much the design leaves.

    Example::

        >>> header, body = bytes_table(harness.measure(case, "cuda", torch.bfloat16, peak=3000.0))
    """
    header = ("case", "dtype", "min MB", "ours MB", "ours / min", "GB/s of min", "GB/s of ours")
    body = [(row.case, row.dtype, _number(row.min_bytes / 1e6), _number(row.our_bytes / 1e6),
             f"{row.our_bytes / row.min_bytes:.2f}x", _number(row.min_gbs), _number(row.our_gbs))
            for row in rows if row.provider == "torchblocks"]
    return header, body


def _write_csv(path: str, rows: List[Row], env: Dict[str, str]) -> None:
    fields = [field.name for field in dataclasses.fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + list(env))
        writer.writeheader()
        for row in rows:
            writer.writerow({**dataclasses.asdict(row), **env})


def _plot_block(path: str, block: str, rows: List[Row], env: Dict[str, str]) -> None:
    """Throughput (and on CUDA peak memory) against size: a panel per variant
    (an optimizer), a colour per provider, a line style per dtype."""
    providers = list(dict.fromkeys(row.provider for row in rows))
    dtypes = list(dict.fromkeys(row.dtype for row in rows))
    variants = list(dict.fromkeys(row.variant for row in rows))
    measures = [("achieved", rows[0].unit)]
    if all(row.peak_mb is not None for row in rows):  # the CPU keeps no allocation counter
        measures.append(("peak_mb", "peak MiB above inputs"))
    panels = {}
    for field, ylabel in measures:
        for variant in variants:
            lines = panels.setdefault(f"{variant} {ylabel}".strip(), {})
            for (color, provider), (style, dtype) in itertools.product(enumerate(providers), enumerate(dtypes)):
                key = (provider, dtype, variant)
                series = sorted((row for row in rows if (row.provider, row.dtype, row.variant) == key),
                                key=lambda row: row.size)
                if series:
                    label = provider if len(dtypes) == 1 else f"{provider} {dtype}"
                    lines[label] = ([row.size for row in series], [getattr(row, field) for row in series],
                                    f"C{color}{('-o', '--s', ':^')[style % 3]}")
    title = f"{block}: {timed(block)}"
    _plot.save_line_plots(path, title, f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
                          rows[0].size_unit, panels, xscale="log", columns=len(variants) if len(variants) > 1 else None,
                          y_from_zero=True)


# The widest line of the header printed above the tables.
HEADER_WIDTH = 100


def header_lines(env: Dict[str, str], notes: Sequence[str]) -> List[str]:
    """The header printed above the tables, no line wider than ``HEADER_WIDTH``:
    the environment's fields joined by " | ", as many to a line as fit, then
    each note wrapped at spaces, its continuation lines indented.

    Example::

        >>> header_lines({"device": "x86_64 (2 threads)", "torch": "2.13.0+cpu"}, ["peaks measured in this run: ..."])
        ['device: x86_64 (2 threads) | torch: 2.13.0+cpu', 'peaks measured in this run: ...']
    """
    lines: List[str] = []
    for field in (f"{key}: {value}" for key, value in env.items()):
        if lines and len(lines[-1]) + len(" | ") + len(field) <= HEADER_WIDTH:
            lines[-1] += " | " + field
        else:
            lines.append(field)
    for note in notes:
        lines += textwrap.wrap(note, HEADER_WIDTH, subsequent_indent="  ", break_long_words=False)
    return lines


def run(blocks: Sequence[str], device: str, dtypes: Sequence[torch.dtype], quick: bool = False,
        out_dir: Optional[str] = None, stream: Optional[TextIO] = None) -> List[Row]:
    """Benchmark ``blocks`` on ``device`` in each of ``dtypes``.

    Args:
        blocks: names from ``BLOCKS``.
        device: ``"cuda"`` or ``"cpu"``.
        dtypes: floating dtypes to run each case in.
        quick: one small case per block (per optimizer for optim), short timing: a smoke run.
        out_dir: where ``<block>.csv``, ``<block>.png`` and ``summary.md`` go; None writes nothing.
        stream: where the tables go (default ``sys.stdout``).

    Returns:
        every Row; ``row.matched`` says whether that provider's output matched the twin's.

    Example::

        >>> rows = run(["dense"], "cuda", [torch.bfloat16], out_dir="results")
        >>> all(row.matched for row in rows)
        True
    """
    stream = stream or sys.stdout
    # compiling torch.optim's step, Dynamo notes once per process that it skips
    # the step's profiler annotation: nothing a reader of the tables can act on
    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_profiler_notes)
    env = harness.environment(device)
    allocator_line = harness.hold_freed_cpu_memory() if device == "cpu" else None
    copy_peak = harness.copy_bandwidth_gbs(device, quick)
    matmul_peaks = {dtype: harness.matmul_peak_tflops(device, dtype, quick) for dtype in dtypes}
    header = " | ".join(f"{key}: {value}" for key, value in env.items())
    matmul_line = ", ".join(f"{str(dtype).split('.')[-1]} {tflops:.1f} TFLOP/s"
                            for dtype, tflops in matmul_peaks.items())
    peak_line = f"peaks measured in this run: copy {copy_peak:.1f} GB/s; native matmul {matmul_line}"
    step_line = step.describe(step.count_training_step(device))
    cpu_lines = [allocator_line, harness.cpu_instruction_sets()] if device == "cpu" else []
    notes = [peak_line, *cpu_lines, step_line]
    print(*header_lines(env, notes), sep="\n", file=stream, flush=True)
    plots = out_dir is not None and _plot.has_matplotlib()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if not plots:
            print("no plots: matplotlib is not installed (pip install 'torchblocks[plot]')", file=stream)
    summary = [f"# torchblocks bench{' --quick' if quick else ''}", "", header.replace(" | ", "  \n"), "",
               *(line for note in notes for line in (note, ""))]
    every_row = []
    for block in blocks:
        rows = []
        for dtype in dtypes:
            for case in BLOCKS[block](device, dtype, quick):
                torch._dynamo.reset()  # each case compiles its own twin, so no recompile limit is hit
                peak = matmul_peaks[dtype] if case.unit == "TFLOP/s" else copy_peak
                rows += harness.measure(case, device, dtype, peak, quick)
        header, body = block_table(rows)
        bytes_header, bytes_body = bytes_table(rows)
        print(f"\n{caption(block, rows)}\n{_table.format_table(header, body)}\n{BYTES_CAPTION}\n"
              f"{_table.format_table(bytes_header, bytes_body)}", file=stream, flush=True)
        summary += [f"## {block}", "", caption(block, rows).replace("\n", "  \n"), "",
                    _table.format_markdown(header, body), "", BYTES_CAPTION.replace("\n", "  \n"), "",
                    _table.format_markdown(bytes_header, bytes_body), ""]
        if out_dir:
            _write_csv(os.path.join(out_dir, f"{block}.csv"), rows, env)
        if plots:
            _plot_block(os.path.join(out_dir, f"{block}.png"), block, rows, env)
        every_row += rows
    if out_dir:
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write("\n".join(summary))
    return every_row
