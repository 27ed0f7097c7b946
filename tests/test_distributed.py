"""torchblocks under DDP and FSDP2, and through distributed checkpoints.

Each test starts its ranks as separate processes on this machine (gloo on
127.0.0.1, a free port, a time limit) running tests/distributed_worker.py,
which trains the torchblocks model and its native twin side by side.
"""

import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from torchblocks.testing import relative_error

from conftest import NO_CUDA, NO_TRITON

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def free_port() -> int:
    """A port nothing listens on, below Linux's ephemeral range (32768-60999):
    a port the kernel handed out could be taken again as the source port of
    some outgoing connection before rank 0 binds it."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def launch(scenario: str, out, world_size: int, interpreter: bool = False, device: str = "cpu") -> list:
    """Run ``scenario`` on ``world_size`` ranks on ``device`` (with
    ``interpreter``, under TRITON_INTERPRET=1); return each rank's results."""
    port = free_port()
    ranks = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "TORCHBLOCKS_TEST_DEVICE": device}
        env.pop("TRITON_INTERPRET", None)
        if interpreter:
            env["TRITON_INTERPRET"] = "1"
        ranks.append(subprocess.Popen([sys.executable, WORKER, scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in ranks:
            process.kill()
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"{scenario} rank {rank} of {world_size} failed:\n{output[-4000:]}"
    return [torch.load(out / f"{scenario}-{world_size}ranks-rank{rank}.pt", map_location="cpu")
            for rank in range(world_size)]


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def largest_difference(ours: dict, native: dict) -> float:
    losses = relative_error(torch.tensor(ours["losses"]), torch.tensor(native["losses"]))
    return max([losses] + [relative_error(mine, theirs) for mine, theirs in zip(ours["params"], native["params"])])


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, launch("fsdp", out, 2)


def test_ddp_trains_as_native_ddp_does(tmp_path):
    ranks = launch("ddp", tmp_path, 2)
    for rank_results in ranks:
        ours, native = rank_results["torchblocks"], rank_results["native"]
        assert len(ours["losses"]) == 6 and ours["losses"][-1] < ours["losses"][0]
        assert largest_difference(ours, native) < 1e-5
    for mine, theirs in zip(ranks[0]["torchblocks"]["params"], ranks[1]["torchblocks"]["params"]):
        assert torch.equal(mine, theirs), "DDP keeps every rank's parameters identical"


def test_fsdp2_shards_parameters_and_steps_local_shards_only(fsdp_run):
    _, ranks = fsdp_run
    for rank_results in ranks:
        ours, native = rank_results["torchblocks"], rank_results["native"]
        assert ours["placements"] == ["(Shard(dim=0),)"]
        assert ours["weight_types_in_forward"] == ["Parameter"], "the blocks see FSDP's unsharded parameters"
        assert ours["state_types"] == native["state_types"] == ["DTensor"]
        assert ours["collectives_in_step"] == [0] * 6, "the step must not gather shards"
        assert largest_difference(ours, native) < 1e-5


@pytest.mark.triton
@NO_TRITON
def test_fsdp2_with_the_triton_kernels_steps_local_shards(tmp_path):
    for rank_results in launch("fsdp_triton", tmp_path, 2, interpreter=not torch.cuda.is_available()):
        ours, native = rank_results["torchblocks"], rank_results["native"]
        assert ours["collectives_in_step"] == [0] * 6
        assert largest_difference(ours, native) < 1e-5


def test_unsupported_placements_raise_naming_the_placement(tmp_path):
    (messages,) = launch("placements", tmp_path, 1)
    assert "placement Partial(sum)" in messages["partial"] and "only Shard and Replicate" in messages["partial"]
    assert "gradient of parameter 0 of param group 0" in messages["grad_placed_differently"]
    assert "placed (Shard(dim=0),); expected a DTensor placed like its parameter, (Replicate(),)" in \
        messages["grad_placed_differently"]
    assert messages["partial_unchanged"] and messages["grad_placed_differently_unchanged"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])])
def test_fsdp2_with_bfloat16_mixed_precision(tmp_path, device):
    world_size = 2 if device == "cpu" else min(2, torch.cuda.device_count())  # nccl: one GPU per rank
    for rank_results in launch("fsdp_bf16", tmp_path, world_size, device=device):
        ours, native = rank_results["torchblocks"], rank_results["native"]
        assert largest_difference(ours, native) < 2e-2


@pytest.mark.parametrize("world_size", [1, 2])
def test_checkpoint_saved_on_two_ranks_resumes_on_any_number(fsdp_run, world_size):
    out, saved = fsdp_run
    resumed = launch("resume", out, world_size)
    for family in ("torchblocks", "native"):
        uninterrupted = saved[0][family]
        for rank_results in resumed:
            again = rank_results[family]
            assert relative_error(torch.tensor(again["losses"]), torch.tensor(uninterrupted["losses"][3:])) < 1e-5
            for mine, theirs in zip(again["params"], uninterrupted["params"]):
                assert relative_error(mine, theirs) < 1e-5
    assert largest_difference(resumed[0]["torchblocks"], resumed[0]["native"]) < 1e-5


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_distributed_mnist_example_runs_under_torchrun(tmp_path, mode):
    example = os.path.join(os.path.dirname(HERE), "examples", "distributed_mnist.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", example,
               "--epochs", "3", "--no-download", *mode]
    # no directory named and an empty default cache: the embedded digits stand in
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TRITON_INTERPRET", None)
    env.pop("TORCHBLOCKS_DATA_DIR", None)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s; its output:\n{_text(timeout.stdout)[-3000:]}\n"
                    f"{_text(timeout.stderr)[-3000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"2 ranks, {'FSDP2' if mode else 'DDP'} on cpu" in done.stdout
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if "mean training loss" in line]
    assert len(losses) == 3 and losses[2] < losses[0]
    accuracy = float(done.stdout.split("test accuracy: ")[1].split()[0])
    assert accuracy > 0.5
