import json
import os
import subprocess
import sys

import torch

from torchblocks import check, cli


def test_check_passes_and_prints_a_table(capsys, tmp_path):
    out = tmp_path / "rows.json"
    # the reference only: the interpreter's rows are the next test's
    assert cli.main(["check", "--device", "cpu", "--backend", "reference", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "block" in table and "max rel err" in table
    rows = json.loads(out.read_text())
    assert {(r["backend"], r["check"]) for r in rows if r["block"] == "relu"} == {
        ("reference", "parity"),
        ("reference", "gradcheck"),
        ("reference", "gradgradcheck"),
    }
    assert all(r["status"] in ("PASS", "SKIP") for r in rows)


def test_check_exits_1_on_a_failure(capsys, monkeypatch):
    def wrong_cases(device, dtype):
        x = torch.randn(4, dtype=dtype, device=device)
        return [check.Case("off by one", lambda t: t + 1, lambda t: t, [x])]

    monkeypatch.setattr(check, "BLOCKS", [check.BlockCheck("broken", wrong_cases)])
    monkeypatch.setattr(check, "OPTIMIZERS", [])
    assert cli.main(["check", "--device", "cpu", "--backend", "reference"]) == 1
    table = capsys.readouterr().out
    assert "broken" in table and "FAIL" in table and "off by one" in table


def test_check_interpreter_flag_from_a_plain_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "torchblocks", "check", "--device", "cpu", "--interpreter"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    triton_rows = [line.split() for line in result.stdout.splitlines() if line.startswith("relu") and " triton " in line]
    assert any(row[4] == "parity" and row[-1] == "PASS" for row in triton_rows)
    assert any(row[4] == "gradcheck" and row[-1] == "PASS" for row in triton_rows)
    assert any(row[4] == "gradgradcheck" and row[-1] == "PASS" for row in triton_rows)
