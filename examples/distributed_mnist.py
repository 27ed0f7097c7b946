"""The book's first network trained on several processes: torchblocks blocks and
optimizer under PyTorch's own DistributedDataParallel or FSDP2, unchanged.

    torchrun --nproc-per-node 2 examples/distributed_mnist.py              # DDP
    torchrun --nproc-per-node 2 examples/distributed_mnist.py --fsdp       # FSDP2 (fully_shard)

On CPUs the ranks talk over gloo, on GPUs over nccl (one GPU per rank).
Each rank trains on its own slice of every global batch of --batch-size
images (the data order is the same on every rank: one seed); gradients are
averaged across ranks, so the run follows the single-process one. Rank 0
reports the test accuracy. Needs torch >= 2.6 (fully_shard made public).
"""

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import torchblocks
from torchblocks.cli import book


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state with fully_shard")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split across the ranks")
    parser.add_argument("--limit", type=int, help="train on the first N training images only")
    parser.add_argument("--data-dir", help="where MNIST is (see torchblocks mnist --help)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        # Rank 0 downloads (when it must) before the others read the cache.
        if rank == 0:
            data = torchblocks.cli.data.load_mnist(args.data_dir, download_missing=args.download)
        dist.barrier()
        if rank != 0:
            data = torchblocks.cli.data.load_mnist(args.data_dir, download_missing=False)
        images, labels = data.train_images[:args.limit].to(device), data.train_labels[:args.limit].to(device)
        if rank == 0:
            print(f"data: {data.describe()}; {len(labels):,} training images, {world} ranks, "
                  f"{'FSDP2' if args.fsdp else 'DDP'} on {device.type}", flush=True)

        model, loss_fn = book.build_network(images.shape[1], seed=args.seed, device=device)
        if args.fsdp:
            mesh = init_device_mesh(device.type, (world,))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            model = fully_shard(model, mesh=mesh)
        else:
            model = DistributedDataParallel(model)
        optimizer = book.build_optimizer(model)

        order = torch.Generator().manual_seed(args.seed)
        steps = math.ceil(len(labels) / args.batch_size)
        for epoch in range(1, args.epochs + 1):
            permutation = torch.randperm(len(labels), generator=order).to(device)
            loss_sum = torch.zeros((), device=device)
            for step in range(steps):
                batch = permutation[step * args.batch_size:(step + 1) * args.batch_size]
                mine = batch[rank::world]  # this rank's slice of the global batch
                loss = loss_fn(model(images[mine]), labels[mine])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(mine)
            dist.all_reduce(loss_sum)
            if rank == 0:
                mean_loss = loss_sum.item() / len(labels)
                print(f"epoch {epoch}/{args.epochs}: mean training loss {mean_loss:.4f}", flush=True)

        # Every rank evaluates (FSDP2 gathers parameters collectively); rank 0 reports.
        test_loss, test_accuracy = book.evaluate(model, loss_fn, data.test_images.to(device),
                                                 data.test_labels.to(device))
        if rank == 0:
            print(f"test accuracy: {test_accuracy:.4f} ({data.name}; test loss {test_loss:.4f})", flush=True)
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()
    # Leave without running destructors. Freeing DDP's reducer frees the gloo process
    # group, whose destructor joins its worker threads while holding the GIL; a worker
    # that drops the last all-reduce launched in backward needs the GIL to free the
    # Python context torch (2.13 here) stored with it: a deadlock (pytorch PRs 180700,
    # 182083), seen in 2 of 4 CI runs. Everything is done and every rank past the barrier.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
