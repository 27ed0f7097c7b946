"""What every benchmark script shares: timing on CUDA and CPU, the measured
copy bandwidth to compare against, the environment header, and the CSV."""

import csv
import datetime
import platform
import subprocess

import torch
import torch.utils.benchmark

import torchblocks


def time_ms(fn, device: str) -> float:
    """Median milliseconds of one call of ``fn``: ``triton.testing.do_bench``
    (warm-up, then repeats) on CUDA, ``torch.utils.benchmark`` on the CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    measurement = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return measurement.median * 1e3


def copy_bandwidth_gbs(nbytes: int, device: str) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per
    second, in GB/s) for a buffer of ``nbytes``: the peak an elementwise
    kernel can hope for."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    return 2 * nbytes / time_ms(lambda: destination.copy_(source), device) / 1e6


def environment(device: str) -> dict:
    """Device name, versions and date, for the header and every CSV row."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    else:
        name, driver = platform.processor() or platform.machine(), ""
        name = f"{name} ({torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": name,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton_version,
        "torchblocks": torchblocks.__version__,
        "date": datetime.date.today().isoformat(),
    }


def print_header(env: dict, **settings):
    """One line: the environment and the run's settings."""
    print(" | ".join(f"{k}: {v}" for k, v in {**env, **settings}.items() if v != ""))


def report(rows, env: dict, csv_path=None):
    """The rows as a table on stdout, and as CSV (with the environment on
    every row) when ``csv_path`` is given."""
    print_table(rows, list(rows[0].keys()))
    if csv_path:
        write_csv(csv_path, rows, env)


def print_table(rows, columns):
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths)))


def write_csv(path, rows, env):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), *env.keys()])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})




def peak_memory_mb(fn, device: str):
    """Peak memory allocated by one call of ``fn`` above what was allocated
    before it, in MB; None on the CPU, where torch keeps no such counter."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
