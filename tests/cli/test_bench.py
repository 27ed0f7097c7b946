"""``torchblocks bench``: the quick suite runs and every timed output matched its twin.

The numbers themselves are never asserted (performance claims live in
benchmarks/README.md, with the command that measured them).
"""

import contextlib
import csv
import io
import itertools
import os
import re
import subprocess
import types

import pytest
import torch

from torchblocks import cli
from torchblocks.cli import bench, book
from torchblocks.cli.bench import harness, training_step
from torchblocks.testing import read_png

from conftest import NO_CUDA


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
    return status, printed.getvalue(), out


def test_quick_suite_runs_every_block_and_every_output_matches(quick_run):
    status, text, out = quick_run
    assert status == 0, text
    assert "device: " in text and "torch: " in text and "triton: " in text and "peaks measured in this run" in text
    for block in bench.BLOCKS:
        assert f"\n{block}: median ms of" in text
        with open(out / f"{block}.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(row["matched"] == "True" for row in rows), block
        assert {row["provider"] for row in rows} >= {"torchblocks", "native", "compiled"}
        assert all(float(row["ms"]) > 0 and row["device"] and row["torch"] for row in rows)
        width, height = read_png(out / f"{block}.png")
        assert width > 300 and height > 200
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# torchblocks bench --quick") and "| case | dtype |" in summary


def test_tables_are_readable(quick_run):
    """At most ~120 characters, no column without data, the direction of every
    speed in words, named dimensions, what is timed said above, no torch log noise."""
    _, text, _ = quick_run
    parts = [part.split("\nbytes: ") for part in text.split("\n\n")[1:] if "torchblocks ms" in part]
    assert len(parts) == len(bench.BLOCKS) and all(len(part) == 2 for part in parts)
    for table, bytes_table in parts:
        assert max(len(line) for line in bytes_table.splitlines()) <= 120
        caption, lines = table.splitlines()[:2], table.splitlines()[2:]
        assert "median ms of" in caption[0] and ("forward + backward" in caption[0] or "one step" in caption[0])
        assert max(len(line) for line in table.splitlines()) <= 120
        header, rule, *body = lines
        columns = [(start, start + len(dashes)) for start, dashes in _spans(rule)]
        for start, end in columns:
            assert any(line[start:end].strip() not in ("", "-") for line in body), header[start:end]
        speeds = [cell for line in body for cell in re.findall(r"\d\.\d\dx (faster|slower)", line)]
        assert speeds
    assert "M=128 N=512 K=784" in text and "N=1024 C=1000" in text
    assert "Profiler record function" not in text


def test_the_header_fits_in_100_columns(quick_run):
    """Every line above the first table, the long training-step note included,
    and no word of a note lost to the wrapping."""
    header = quick_run[1].split("\n\n")[0].splitlines()
    assert max(len(line) for line in header) <= bench.HEADER_WIDTH == 100
    assert any(line.startswith("one training step of the book network") for line in header)
    note = " ".join(f"word{i}" for i in range(60))
    wrapped = bench.header_lines({"device": "d" * 50, "torch": "t" * 30, "triton": "3.9.0"}, [note])
    assert wrapped[:2] == ["device: " + "d" * 50 + " | torch: " + "t" * 30, "triton: 3.9.0"]
    assert len(wrapped) > 3 and max(len(line) for line in wrapped) <= 100
    assert " ".join(line.strip() for line in wrapped[2:]) == note


def _spans(rule: str):
    """(start, dashes) of each column of a table's rule line."""
    return [(match.start(), match.group()) for match in re.finditer(r"-+", rule)]


def test_optimizer_cases_include_the_fused_twin_where_torch_has_one(quick_run):
    with open(quick_run[2] / "optim.csv") as f:
        providers = {(row["variant"], row["provider"]) for row in csv.DictReader(f)}
    assert ("Adam", "fused") in providers and ("RMSprop", "fused") not in providers


def tiny_case(providers, rotate=True):
    def make_inputs(seed, provider):
        return (torch.full((4,), float(seed + 1)),)

    return harness.Case("toy", "4", 4, "elements", 32, "GB/s", make_inputs, providers, min_bytes=32, our_bytes=32,
                        rotate=rotate)


def test_a_wrong_provider_is_flagged_not_timed_as_a_win():
    case = tiny_case({"torchblocks": lambda inputs: [inputs[0] * 1.01], "native": lambda inputs: [inputs[0]]})
    rows = {row.provider: row for row in harness.measure(case, "cpu", torch.float32, peak=1.0, quick=True)}
    assert rows["native"].matched and not rows["torchblocks"].matched
    assert rows["torchblocks"].error == pytest.approx(0.01, rel=1e-3)
    header, body = bench.block_table(list(rows.values()))
    assert body[0][header.index("matched")] == "NO"


def test_timed_calls_rotate_through_distinct_input_sets():
    seen = set()

    def provider(inputs):
        seen.add(inputs[0][0].item())
        return [inputs[0]]

    harness.measure(tiny_case({"torchblocks": provider, "native": provider}), "cpu", torch.float32, 1.0, quick=True)
    assert seen == {float(seed + 1) for seed in range(harness.MAX_ROTATIONS)}
    seen.clear()
    harness.measure(tiny_case({"torchblocks": provider, "native": provider}, rotate=False), "cpu", torch.float32, 1.0,
                    quick=True)
    assert seen == {1.0}


def test_cpu_input_sets_are_made_provider_by_provider_in_turn():
    made = []

    def make_inputs(seed, provider):
        made.append((seed, provider))
        return (torch.full((4,), float(seed + 1)),)

    names = ["torchblocks", "native"]
    case = harness.Case("toy", "4", 4, "elements", 32, "GB/s", make_inputs,
                        {name: (lambda inputs: [inputs[0]]) for name in names}, min_bytes=32, our_bytes=32)
    harness.measure(case, "cpu", torch.float32, 1.0, quick=True)
    assert made == [(seed, name) for seed in range(harness.MAX_ROTATIONS) for name in names]


def test_cpu_rounds_alternate_the_order_of_the_providers(monkeypatch):
    ran, timed = [], []

    def provider(name):
        def run(inputs):
            ran.append(name)
            return [inputs[0]]
        return run

    class Timer:
        def __init__(self, fn):
            fn()
            timed.append(ran[-1])

        def blocked_autorange(self, min_run_time):
            return types.SimpleNamespace(median=1e-3)

    monkeypatch.setattr(harness, "cpu_timer", Timer)
    names = ["torchblocks", "native", "compiled"]
    harness.measure(tiny_case({name: provider(name) for name in names}), "cpu", torch.float32, 1.0, quick=True)
    rounds = [timed[i:i + len(names)] for i in range(0, len(timed), len(names))]
    assert len(rounds) == harness.QUICK_ROUNDS
    assert rounds == [names if index % 2 == 0 else names[::-1] for index in range(harness.QUICK_ROUNDS)]


def test_the_training_step_case_cycles_through_distinct_batches(monkeypatch):
    """One batch stepped on over and over is fitted to a loss of ~0 and turns
    RMSprop's state denormal: the case must step through BATCHES batches."""
    labels_seen = []
    build_network = book.build_network

    def recording_network(*args, **kwargs):
        model, loss_fn = build_network(*args, **kwargs)

        def loss(logits, labels):
            labels_seen.append(labels.tolist())
            return loss_fn(logits, labels)

        return model, loss

    monkeypatch.setattr(book, "build_network", recording_network)
    case = next(training_step.cases("cpu", torch.float32, quick=True))
    trainer = case.make_inputs(0, "native")
    for _ in range(training_step.BATCHES + 1):
        trainer.step()
    assert len({tuple(labels) for labels in labels_seen}) == training_step.BATCHES
    assert labels_seen[-1] == labels_seen[0]


def test_cpu_calls_are_timed_on_the_threads_the_device_name_states(monkeypatch):
    threads = []

    def provider(inputs):
        return [inputs[0]]

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what harness reads; Timer then sets it
    monkeypatch.setattr(torch, "set_num_threads", lambda count: threads.append(("set", count)))
    harness.measure(tiny_case({"torchblocks": provider, "native": provider}), "cpu", torch.float32, 1.0, quick=True)
    assert ("set", 2) in threads and ("set", 1) not in threads
    assert harness.environment("cpu")["device"].endswith("(2 threads)")


def test_cpu_runs_keep_freed_memory_and_say_so(quick_run, monkeypatch):
    """A CPU run asks glibc to keep freed memory (no heap trimming, no mmap
    below 32 MiB), so that large tensors are not page-faulted in anew on each
    call; the summary says what was done, or that nothing could be."""
    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(harness.ctypes, "CDLL", lambda name: Libc())
    assert "no trimming, no mmap below 32 MiB" in harness.hold_freed_cpu_memory()
    assert sorted(calls) == [(-3, 32 << 20), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(harness.ctypes, "CDLL", no_glibc)
    assert harness.hold_freed_cpu_memory() == "allocator: as the process found it (no glibc mallopt)"
    summary = (quick_run[2] / "summary.md").read_text()
    assert re.search(r"\n\nallocator: (glibc malloc keeps freed memory|as the process found it)", summary)


def test_cpu_results_name_the_instruction_sets_they_ran(monkeypatch, quick_run):
    """torch's CPU capability and the optimizer steps' loop, as the compiled module reports it, or that it is off."""
    from torchblocks._ops import _eager_cpu

    summary = (quick_run[2] / "summary.md").read_text()
    assert f"\n\ninstruction sets: torch's CPU kernels {torch.backends.cpu.get_cpu_capability()}; " in summary
    module = _eager_cpu.module()
    if module is not None:
        assert f"torchblocks' optimizer steps {module.step_instruction_set()}\n" in summary
    monkeypatch.setattr(_eager_cpu, "module", lambda: None)
    assert harness.cpu_instruction_sets().endswith("optimizer steps the foreach reference (no compiled eager path)")


def test_results_name_the_commit_of_this_checkout():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert harness.environment("cpu")["commit"] == head.stdout.strip()


def test_every_block_yields_cases_for_every_device_and_mode():
    for (name, cases), device, quick in itertools.product(bench.BLOCKS.items(), ("cpu", "cuda"), (False, True)):
        found = list(cases(device, torch.float32, quick))
        assert found and all(case.block == name and case.work > 0 for case in found)
        assert all({"torchblocks", "native", "compiled"} <= set(case.providers) for case in found)


def test_every_case_has_a_bytes_model_at_or_above_the_minimum():
    """And the summary shows it: min and ours, and GB/s against each."""
    for cases, device, dtype in itertools.product(bench.BLOCKS.values(), ("cpu", "cuda"),
                                                  (torch.float32, torch.bfloat16, torch.float64)):
        for case in cases(device, dtype, False):
            assert 0 < case.min_bytes <= case.our_bytes, (case.label, device, dtype)


def test_the_summary_has_the_bytes_model_and_the_step_counts(quick_run):
    summary = (quick_run[2] / "summary.md").read_text()
    assert summary.count("| case | dtype | min MB | ours MB | ours / min | GB/s of min | GB/s of ours |") == len(
        bench.BLOCKS)
    assert re.search(r"\d+ Triton launches, \d+ other tensor ops, \d+ allocations", summary)


def test_bench_refuses_cuda_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@NO_CUDA
def test_quick_suite_on_cuda_measures_memory(tmp_path):
    rows = bench.run(["relu"], "cuda", [torch.float32], quick=True, out_dir=str(tmp_path))
    assert all(row.matched and row.peak_mb is not None for row in rows)


def test_bench_plots_start_throughput_at_zero(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)
    case = tiny_case({"torchblocks": lambda inputs: [inputs[0]], "native": lambda inputs: [inputs[0]]})
    rows = harness.measure(case, "cpu", torch.float32, peak=1.0, quick=True)
    bench._plot_block(str(tmp_path / "toy.png"), "toy", rows, harness.environment("cpu"))
    assert all(axis.get_ylim()[0] == 0 for axis in figures[0].axes if axis.get_visible())
