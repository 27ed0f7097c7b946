"""What every benchmark shares: the case description, timing with rotated
inputs, peak memory, the device's measured peaks, the check against the twin,
and the environment header.

Timing: on CUDA the median of ``triton.testing.do_bench`` (warm-up, repeats,
L2 flushed between calls); on the CPU the median of ``torch.utils.benchmark``'s
``blocked_autorange``, taken in ROUNDS rounds that interleave the providers
(a shared machine's speed drifts over seconds; interleaved, the drift falls
on every provider alike). Either way the timed call cycles through several
copies of its inputs, together larger than the caches, so no call finds the
previous call's data still cached.
"""

import ctypes
import dataclasses
import datetime
import itertools
import math
import os
import platform
import re
import subprocess
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.utils.benchmark

import torchblocks
from torchblocks.testing import HALF_DTYPES, TF32_TOLERANCE, relative_error, tolerance

# Rotate through input copies until they hold this many bytes (larger than
# any L2 or L3 cache here), at most MAX_ROTATIONS copies.
ROTATION_BYTES = 256 * 2**20
MAX_ROTATIONS = 64
# CPU rounds, and the seconds of each. Native timed against itself (ReLU at
# 16 MiB, five runs each) read 0.75-1.04x from 5 rounds of 0.1 s and
# 0.92-1.08x from 15: this machine's state drifts over seconds, and more
# rounds sample more of it. --quick checks that every case runs, in 5
# rounds of 0.01 s.
ROUNDS, ROUND_SECONDS = 15, 0.1
QUICK_ROUNDS, QUICK_ROUND_SECONDS = 5, 0.01

# A provider takes one input set and returns the tensors to compare with the
# twin's (outputs, gradients, updated parameters).
Provider = Callable[[Any], Sequence[torch.Tensor]]


@dataclasses.dataclass
class Case:
    """One benchmark point of a block.

    Attributes:
        block: the block's name (``"relu"``).
        label: the case as shown in the table (``"4096x1000"``).
        size: its position on the plot's x axis, in ``size_unit``.
        work: bytes moved (``unit="GB/s"``) or floating-point operations
            (``unit="TFLOP/s"``) by one call.
        make_inputs: ``make_inputs(seed, provider)``: a fresh input set for
            that provider, the same values for one seed whichever the provider.
        providers: name -> provider; ``"native"`` is the twin every other is checked against.
        min_bytes: the fewest bytes one call must move to and from memory
            (every input read once, every output written once).
        our_bytes: the bytes torchblocks' implementation moves by
            construction (each kernel's reads and writes, each GEMM operand
            once: no cache effects); its GB/s against both say how close to
            the bandwidth it runs and how much its design leaves on the table.
        variant: a sub-series of the block (an optimizer's name), or "".
        matmul: the work is GEMMs (float32 may run in TF32 on a GPU).
        rotate: cycle through several input sets (off where a provider holds
            per-input state, as a compiled optimizer step does).
    """
    block: str
    label: str
    size: float
    size_unit: str
    work: float
    unit: str
    make_inputs: Callable[[int, str], Any]
    providers: Dict[str, Provider]
    min_bytes: float
    our_bytes: float
    variant: str = ""
    matmul: bool = False
    rotate: bool = True


@dataclasses.dataclass
class Row:
    """One provider on one case: what the table, CSV and plot show."""
    block: str
    variant: str
    case: str
    size: float
    size_unit: str
    dtype: str
    provider: str
    ms: float
    peak_mb: Optional[float]
    achieved: float
    unit: str
    of_peak: float
    error: float
    matched: bool
    min_bytes: float
    our_bytes: float
    min_gbs: float  # min_bytes / ms: the bandwidth the call achieves as if it moved the minimum
    our_gbs: float  # our_bytes / ms: the bandwidth torchblocks' kernels achieve (torchblocks' row only)


def training_step(forward: Callable[..., torch.Tensor]) -> Provider:
    """A provider for a block: one forward and backward pass over an input set
    ``(args, leaves, grad_output)``, returning the output and the leaves' gradients.

    Example::

        >>> x = torch.randn(8, requires_grad=True)
        >>> output, grad_x = training_step(torch.relu)(((x,), (x,), torch.ones(8)))
    """
    def step(inputs):
        args, leaves, grad_output = inputs
        for leaf in leaves:
            leaf.grad = None
        output = forward(*args)
        output.backward(grad_output)
        return (output.detach(), *(leaf.grad for leaf in leaves))

    return step


def block_providers(ours: Callable[..., torch.Tensor], native: Callable[..., torch.Tensor]) -> Dict[str, Provider]:
    """A block's three providers: torchblocks' block, its native twin, and the
    twin under ``torch.compile``, each one ``training_step``.

    Example::

        >>> providers = block_providers(torchblocks.functional.relu, torch.relu)
    """
    return {"torchblocks": training_step(ours), "native": training_step(native),
            "compiled": training_step(torch.compile(native))}


def tensors_in(value) -> List[torch.Tensor]:
    """Every tensor in a (nested) tuple or list.

    Example::

        >>> len(tensors_in(((torch.ones(2),), (torch.ones(3), None), torch.ones(1))))
        3
    """
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def generator(device: str, seed: int) -> torch.Generator:
    """The random source of one input set: the same seed gives the same inputs to every provider.

    Example::

        >>> x = torch.randn(1024, generator=generator("cpu", 0))
    """
    return torch.Generator(device=device).manual_seed(seed)


def time_ms(fn: Callable[[], Any], device: str, quick: bool = False) -> float:
    """The median milliseconds of one call of ``fn`` (see the module docstring).

    Example::

        >>> a = torch.randn(1024, 1024)
        >>> time_ms(lambda: a @ a, "cpu", quick=True)
        5.1...
    """
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median")
    fn()
    return cpu_timer(fn).blocked_autorange(min_run_time=0.05 if quick else 0.5).median * 1e3


def cpu_timer(fn: Callable[[], Any]) -> torch.utils.benchmark.Timer:
    """``torch.utils.benchmark.Timer`` of ``fn()`` on the threads torch uses
    here, as the results' device name says (the Timer's default is one).

    Example::

        >>> cpu_timer(lambda: a @ a).blocked_autorange().median
    """
    return torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def cpu_instruction_sets() -> str:
    """The line the CPU results print about the vector code they ran: the
    instruction set torch's CPU kernels dispatch to, and the one the
    optimizers' compiled steps run in (optim_cpu.cpp), or that the compiled
    eager path is off and the steps are the foreach reference.

    Example::

        >>> cpu_instruction_sets()
        "instruction sets: torch's CPU kernels AVX512; torchblocks' optimizer steps avx2"
    """
    from torchblocks._ops import _eager_cpu

    module = _eager_cpu.module()
    steps = module.step_instruction_set() if module is not None else "the foreach reference (no compiled eager path)"
    return (f"instruction sets: torch's CPU kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"torchblocks' optimizer steps {steps}")


def hold_freed_cpu_memory() -> str:
    """Keep glibc's malloc from handing freed memory back to the system, for
    the rest of the process: no trimming of the heap, no mmap below 32 MiB
    (the ceiling of glibc's own adaptive threshold). Otherwise a tensor of
    1 MiB or more is often page-faulted in anew on each call, at a cost set
    by the heap's history rather than by the code timed: ReLU forward +
    backward at 4 MiB took 2.7 ms or 0.34 ms a call by that alone,
    torchblocks and native alike, and a case moved by up to 30% between
    runs. Larger tensors stay mmapped, faulted in on each call as before:
    held in the heap, 256 MiB ones fragmented it (one run took 5x longer).
    Returns the line the results print about it.

    Example::

        >>> hold_freed_cpu_memory()
        'allocator: glibc malloc keeps freed memory (mallopt: no trimming, no mmap below 32 MiB)'
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        held = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        held = False
    if held:
        return "allocator: glibc malloc keeps freed memory (mallopt: no trimming, no mmap below 32 MiB)"
    return "allocator: as the process found it (no glibc mallopt)"


def peak_memory_mb(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Memory one call of ``fn`` allocates above what was allocated before it, in MiB (CUDA only; else None).

    Example::

        >>> x = torch.randn(2**20, device="cuda")
        >>> peak_memory_mb(lambda: x * 2, "cuda")
        4.0
    """
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbs(device: str, quick: bool = False) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s)
    of a 256 MiB buffer (32 MiB in quick runs).

    Example::

        >>> copy_bandwidth_gbs("cuda")
        2900.0...
    """
    nbytes = (32 if quick else 256) * 2**20
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    return 2 * nbytes / time_ms(lambda: destination.copy_(source), device, quick) / 1e6


def matmul_peak_tflops(device: str, dtype: torch.dtype, quick: bool = False) -> float:
    """TFLOP/s of a large native square matmul in ``dtype``: the GEMM peak to compare against.

    Example::

        >>> matmul_peak_tflops("cuda", torch.bfloat16)
        700.0...
    """
    size = (4096 if quick else 8192) if device == "cuda" else (512 if quick else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / time_ms(lambda: a @ b, device, quick) / 1e9


def _rotations(input_set, device: str, enabled: bool) -> int:
    if not enabled:
        return 1
    nbytes = sum(t.numel() * t.element_size() for t in tensors_in(input_set))
    count = max(1, min(MAX_ROTATIONS, math.ceil(ROTATION_BYTES / max(nbytes, 1))))
    if device == "cuda":  # leave room for the provider's own temporaries
        count = max(1, min(count, int(0.25 * torch.cuda.mem_get_info()[0] // max(nbytes, 1))))
    return count


# The tests hold float16 and bfloat16 to the twin rule against a float64 run
# (torchblocks.testing); a timing run has no float64 twin, so it only flags a
# provider that is off: more than 1e-2 from native.
HALF_SANITY = 1e-2


def _tolerance(case: Case, dtype: torch.dtype, device: str) -> float:
    allowed = HALF_SANITY if dtype in HALF_DTYPES else tolerance(dtype)
    if case.matmul and device == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        allowed = max(allowed, TF32_TOLERANCE)
    return allowed


def _input_sets(case: Case, names, device: str) -> dict:
    """{provider: its input sets} for the providers ``names``, the sets made
    in turn (set 1 of each, then set 2 of each, ...), so that no provider's
    sets all sit in memory freed by the case before: ReLU at 1 MiB, timed as
    native in torchblocks' place, read 0.93-0.99x against native when its
    sets were made first."""
    sets = {name: [case.make_inputs(0, name)] for name in names}
    counts = {name: _rotations(first, device, case.rotate) for name, (first,) in sets.items()}
    for seed in range(1, max(counts.values())):
        for name in names:
            if seed < counts[name]:
                sets[name].append(case.make_inputs(seed, name))
    return sets


def _cycling_call(case: Case, name: str, input_sets: list):
    """(provider ``name``'s result on the first of ``input_sets``, copied to the CPU; a call cycling through them)."""
    provider = case.providers[name]
    sets = itertools.cycle(input_sets)
    result = [t.detach().to("cpu", torch.float32, copy=True) for t in provider(next(sets))]

    def call():
        return provider(next(sets))

    return result, call


def _run_provider(case: Case, name: str, device: str, quick: bool):
    """(the result on input set 0; its median ms; its peak MiB), one provider
    at a time: its input sets live only here, so they are freed before the
    next provider's are made (CUDA memory)."""
    result, call = _cycling_call(case, name, _input_sets(case, [name], device)[name])
    return result, time_ms(call, device, quick), peak_memory_mb(call, device)


def _run_interleaved(case: Case, device: str, quick: bool):
    """{provider: (result, median ms, None)} on the CPU: every provider's
    input sets made first, in turn, then ROUNDS rounds (QUICK_ROUNDS when
    ``quick``) timing each provider in turn, in the reverse order every other
    round, so that no provider always runs first; a provider's time is the
    median of its rounds."""
    prepared = {name: _cycling_call(case, name, input_sets)
                for name, input_sets in _input_sets(case, list(case.providers), device).items()}
    rounds = {name: [] for name in prepared}
    count, seconds = (QUICK_ROUNDS, QUICK_ROUND_SECONDS) if quick else (ROUNDS, ROUND_SECONDS)
    for round_index in range(count):
        order = list(prepared) if round_index % 2 == 0 else list(reversed(prepared))
        for name in order:
            call = prepared[name][1]
            call()
            rounds[name].append(cpu_timer(call).blocked_autorange(min_run_time=seconds).median)
    return {name: (result, 1e3 * sorted(rounds[name])[count // 2], None) for name, (result, _) in prepared.items()}


def measure(case: Case, device: str, dtype: torch.dtype, peak: float, quick: bool = False) -> List[Row]:
    """Check every provider of ``case`` once against ``"native"``, then time it; one Row per provider.

    Each provider gets its own input sets (the same seeds, so the same values):
    set 0 is used for the check, then the timed calls cycle through all of them.

    Example::

        >>> rows = measure(next(relu.cases("cuda", torch.bfloat16, quick=True)), "cuda", torch.bfloat16, peak=3000.0)
        >>> [(row.provider, row.ms, row.matched) for row in rows]
        [('torchblocks', 0.012, True), ('native', 0.013, True), ('compiled', 0.012, True)]
    """
    if device == "cuda":
        runs = {name: _run_provider(case, name, device, quick) for name in case.providers}
    else:
        runs = _run_interleaved(case, device, quick)
    native = runs["native"][0]
    allowed = _tolerance(case, dtype, device)
    rows = []
    for name, (result, ms, peak_mb) in runs.items():
        achieved = case.work / ms / (1e6 if case.unit == "GB/s" else 1e9)
        error = max(relative_error(mine, theirs) for mine, theirs in zip(result, native))
        matched = len(result) == len(native) and error <= allowed
        rows.append(Row(case.block, case.variant, case.label, case.size, case.size_unit, str(dtype).split(".")[-1],
                        name, ms, peak_mb, achieved, case.unit, achieved / peak, error, matched, case.min_bytes,
                        case.our_bytes, case.min_bytes / ms / 1e6, case.our_bytes / ms / 1e6))
    return rows


def environment(device: str) -> Dict[str, str]:
    """Device, driver, versions, date and commit: the header of every table and CSV."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
        cuda = torch.version.cuda or "unknown"
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        driver = cuda = "-"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"device": name, "driver": driver, "cuda": cuda, "torch": torch.__version__, "triton": triton_version,
            "torchblocks": torchblocks.__version__, "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def results_folder_name(device: str) -> str:
    """The folder under benchmarks/results/ for ``device``'s results: its name
    as a slug ("nvidia-h100-80gb-hbm3", "cpu-x86-64-2-threads").

    Example::

        >>> results_folder_name("cpu")
        'cpu-x86-64-2-threads'
    """
    name = environment(device)["device"]
    return re.sub(r"[^a-z0-9]+", "-", (name if device == "cuda" else f"cpu {name}").lower()).strip("-")


def _commit() -> str:
    """The git commit torchblocks runs from, when it runs from a checkout; else "-"."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))  # torchblocks/cli/bench/..
    if not os.path.isfile(os.path.join(root, "setup.py")):  # an installed copy, not a checkout
        return "-"
    try:
        result = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "-"
    return result.stdout.strip() if result.returncode == 0 else "-"
