import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import torchblocks
from conftest import NO_INTERPRETER, NO_TRITON
from torchblocks import cli
from torchblocks.cli import cases, check


def test_check_passes_and_prints_a_table_with_progress(capsys, tmp_path):
    out = tmp_path / "rows.json"
    # the reference only, one block and one optimizer: the interpreter's rows are the next test's,
    # every block's and optimizer's cases tests/cli/test_cases.py's and tests/test_optim.py's
    assert cli.main(["check", "--device", "cpu", "--backend", "reference", "--block", "relu", "Adam",
                     "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "block" in captured.out and "max rel err" in captured.out
    rows = json.loads(out.read_text())
    assert {(r["backend"], r["check"]) for r in rows if r["block"] == "relu"} == {
        ("reference", "parity"),
        ("reference", "gradcheck"),
        ("reference", "gradgradcheck"),
    }
    assert all(r["status"] == "PASS" for r in rows)
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == len(rows) and progress[0].startswith("[1/2] relu cpu/reference float32 parity: PASS (")
    assert {r["block"] for r in rows} == {"relu", "Adam"}


@pytest.mark.triton
@NO_TRITON
@NO_INTERPRETER
def test_check_runs_bfloat16_on_the_interpreter():
    """A bfloat16 row for every block and optimizer on the Triton backend
    under the interpreter, computed (the interpreter computes bfloat16 as a
    GPU does) and passed by the twin rule; their gradcheck rows and the
    other option sets are the same as float32's, left out here."""
    rows = [next(check.run_block(dataclasses.replace(block, dtypes=[torch.bfloat16]), "cpu", "triton"))
            for block in cases.BLOCKS]
    rows += [next(check.run_optimizer(dataclasses.replace(entry, dtypes=[torch.bfloat16],
                                                          option_sets=entry.option_sets[:1]), "cpu", "triton"))
             for entry in cases.OPTIMIZERS]
    assert [row.block for row in rows] == check.names()
    for row in rows:
        assert (row.backend, row.dtype, row.status) == ("triton", "bfloat16", "PASS"), row
        assert row.cases > 0 and 0 <= row.max_rel_error < 0.03, row


def test_check_exits_1_on_a_failure(capsys, monkeypatch):
    def wrong_cases(device, dtype):
        x = torch.randn(4, dtype=dtype, device=device)
        return [cases.Case("off by one", lambda t: t + 1, lambda t: t, [x])]

    monkeypatch.setattr(check, "BLOCKS", [cases.BlockCheck("broken", wrong_cases)])
    monkeypatch.setattr(check, "OPTIMIZERS", [])
    assert cli.main(["check", "--device", "cpu", "--backend", "reference"]) == 1
    table = capsys.readouterr().out
    assert "broken" in table and "FAIL" in table and "off by one" in table


def test_a_check_that_ran_nothing_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(check, "targets", lambda device, backends: [])
    assert cli.main(["check", "--device", "cpu", "--backend", "triton"]) == 2
    assert "nothing to check on device cpu with backend triton" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_check_on_cuda_without_a_gpu_says_so_like_mnist_and_bench(capsys):
    for command in (["check"], ["bench"], ["mnist"]):
        assert cli.main([*command, "--device", "cuda"]) == 2
        assert f"torchblocks {command[0]}: --device cuda, but CUDA is not available here" in capsys.readouterr().err


def test_quick_check_narrows_dtypes_and_option_sets():
    rows = check.run("cpu", "reference", only=["dense", "Adam"], quick=True)
    assert {r.block for r in rows} == {"dense", "Adam"}
    assert {r.dtype for r in rows} == {"float32", "float64"}
    assert {r.cases for r in rows if r.block == "Adam"} == {check.QUICK_OPTION_SETS}


def test_version_and_help_are_plain_text(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"torchblocks {torchblocks.__version__}"
    for argv in (["--help"], ["check", "--help"], ["mnist", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and "usage: torchblocks" in text
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    check_help = capsys.readouterr().out
    assert "Check every block" in check_help and "(default: all present)" in check_help


def test_check_interpreter_flag_from_a_plain_process():
    """--interpreter from a process without TRITON_INTERPRET: the Triton rows come
    from a child that has it; the interpreter's expected numpy warnings stay out."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "torchblocks", "check", "--device", "cpu", "--interpreter", "--quick",
         "--block", "relu", "SGD"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    triton_rows = [line.split() for line in result.stdout.splitlines() if " triton " in line]
    assert {row[0] for row in triton_rows} == {"relu", "SGD"}
    assert all(row[-1] == "PASS" or row[-3] == "PASS" for row in triton_rows)
    assert {row[4] for row in triton_rows if row[0] == "relu"} == {"parity", "gradcheck", "gradgradcheck"}
    assert "RuntimeWarning" not in result.stderr and "relu cpu/triton float64 parity: PASS" in result.stderr
