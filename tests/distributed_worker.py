"""One rank of the distributed tests (tests/test_distributed.py starts them).

    python tests/distributed_worker.py SCENARIO OUT_DIR

with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment, and
TORCHBLOCKS_TEST_DEVICE=cuda to run on GPUs (nccl) instead of CPUs (gloo). Every
scenario trains a torchblocks model with a torchblocks optimizer and the same
model in native PyTorch with torch.optim, side by side in this process, from
the same initial weights on the same batches, and saves what the test
compares to OUT_DIR/SCENARIO-<W>ranks-rank<R>.pt:

    ddp          DistributedDataParallel, RMSprop.
    fsdp         fully_shard (FSDP2), AdamW; counts the collectives inside
                 optimizer.step(); saves a distributed checkpoint of both
                 runs after CHECKPOINT_STEP steps, then trains on.
    fsdp_triton  fsdp's training with torchblocks' Triton kernels (run under
                 TRITON_INTERPRET=1 on the CPU): the optimizer's fused step
                 addresses each rank's local shards.
    fsdp_bf16    fully_shard with MixedPrecisionPolicy(param_dtype=bfloat16), AdamW.
    placements   what a torchblocks optimizer says of DTensors it cannot update.
    resume       loads that checkpoint on this run's number of ranks and
                 trains on with the same batches.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel

import torchblocks

IN_FEATURES, HIDDEN, CLASSES = 16, 32, 5
GLOBAL_BATCH = 16  # split evenly over 1 or 2 ranks
STEPS = 6
CHECKPOINT_STEP = 3
DEVICE = os.environ.get("TORCHBLOCKS_TEST_DEVICE", "cpu")


def build(native: bool, seed: int) -> nn.Sequential:
    """Dense(16, 32, relu) -> Dense(32, 5), or its native twin; same weights for one seed."""
    torch.manual_seed(seed)
    if native:
        model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    else:
        model = nn.Sequential(torchblocks.nn.Dense(IN_FEATURES, HIDDEN, activation="relu"),
                              torchblocks.nn.Dense(HIDDEN, CLASSES))
    return model.to(DEVICE)


def loss_fn(native: bool):
    return F.cross_entropy if native else torchblocks.functional.softmax_cross_entropy


def local_batch(step: int):
    """This rank's rows of the step's global batch (the same global batch whatever the world size)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator)
    y = torch.randint(CLASSES, (GLOBAL_BATCH,), generator=generator)
    rows = GLOBAL_BATCH // dist.get_world_size()
    start = dist.get_rank() * rows
    return x[start:start + rows].to(DEVICE), y[start:start + rows].to(DEVICE)


def global_mean(value: torch.Tensor) -> float:
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def train_step(model, optimizer, native: bool, step: int):
    """One step on ``step``'s batch: (the global mean loss, collectives inside optimizer.step())."""
    x, y = local_batch(step)
    optimizer.zero_grad()
    loss = loss_fn(native)(model(x), y)
    loss.backward()
    with CommDebugMode() as comm:
        optimizer.step()
    return global_mean(loss), comm.get_total_counts()


def full_parameters(model):
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone() for p in model.parameters()]


def shard(model, mesh, mp_policy=None):
    options = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, **options)
    return fully_shard(model, **options)


def ddp(out):
    results = {}
    for native in (False, True):
        model = DistributedDataParallel(build(native, seed=0))
        optimizer_class = torch.optim.RMSprop if native else torchblocks.optim.RMSprop
        optimizer = optimizer_class(model.parameters(), lr=1e-2, alpha=0.9, eps=1e-7)
        losses = [train_step(model, optimizer, native, step)[0] for step in range(STEPS)]
        results["native" if native else "torchblocks"] = {"losses": losses, "params": full_parameters(model)}
    return results


def fsdp(out, mp_policy=None, save=True):
    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    results = {}
    for native in (False, True):
        name = "native" if native else "torchblocks"
        model = shard(build(native, seed=0), mesh, mp_policy)
        optimizer_class = torch.optim.AdamW if native else torchblocks.optim.AdamW
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
        placements = sorted({str(p.placements) for p in model.parameters()}) if all(
            isinstance(p, DTensor) for p in model.parameters()) else ["not all DTensors"]
        weight_types_in_forward = set()
        model[0].register_forward_pre_hook(lambda layer, args: weight_types_in_forward.add(type(layer.weight).__name__))
        losses, collectives = [], []
        for step in range(STEPS):
            if step == CHECKPOINT_STEP and save:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=os.path.join(out, name))
            loss, count = train_step(model, optimizer, native, step)
            losses.append(loss)
            collectives.append(count)
        state_types = sorted({type(value).__name__ for state in optimizer.state.values() for key, value in state.items()
                              if key != "step"})
        results[name] = {"losses": losses, "params": full_parameters(model), "placements": placements,
                         "collectives_in_step": collectives, "state_types": state_types,
                         "weight_types_in_forward": sorted(weight_types_in_forward)}
    return results


def resume(out):
    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    results = {}
    for native in (False, True):
        name = "native" if native else "torchblocks"
        model = shard(build(native, seed=123), mesh)  # other weights: only the checkpoint can make it match
        optimizer_class = torch.optim.AdamW if native else torchblocks.optim.AdamW
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(out, name))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        losses = [train_step(model, optimizer, native, step)[0] for step in range(CHECKPOINT_STEP, STEPS)]
        results[name] = {"losses": losses, "params": full_parameters(model)}
    return results


def fsdp_triton(out):
    with torchblocks.use_backend("triton"):
        return fsdp(out, save=False)


def placements(out):
    """The error messages for a Partial parameter and for a gradient placed unlike its parameter."""
    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    messages = {}
    cases = {"partial": (Partial(), Partial()), "grad_placed_differently": (Replicate(), Shard(0))}
    for case, (param_placement, grad_placement) in cases.items():
        param = DTensor.from_local(torch.randn(4, 3, device=DEVICE), mesh, [param_placement]).requires_grad_()
        param.grad = DTensor.from_local(torch.randn(4, 3, device=DEVICE), mesh, [grad_placement])
        before = param.to_local().clone()
        try:
            torchblocks.optim.Adam([param], lr=0.1).step()
            messages[case] = "no error"
        except RuntimeError as error:
            messages[case] = str(error)
        messages[case + "_unchanged"] = torch.equal(param.to_local(), before)
    return messages


SCENARIOS = {
    "ddp": ddp,
    "fsdp": fsdp,
    "fsdp_triton": fsdp_triton,
    "fsdp_bf16": lambda out: fsdp(out, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                                  save=False),
    "placements": placements,
    "resume": resume,
}


def main(scenario: str, out: str) -> None:
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    try:
        results = SCENARIOS[scenario](out)
        torch.save(results, os.path.join(out, f"{scenario}-{dist.get_world_size()}ranks-rank{dist.get_rank()}.pt"))
        # FSDP2 state sits in reference cycles holding gloo work objects; left to
        # interpreter finalization, freeing them can abort the process (SIGABRT,
        # "terminate called without an active exception": seen once in CI).
        gc.collect()
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
