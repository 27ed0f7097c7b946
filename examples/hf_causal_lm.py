"""A tiny Llama (random weights, no download) trained a few steps with and
without torchblocks: the losses side by side, then the peak memory of the
loss computation, where the (tokens, vocab) logits live.

    pip install "torchblocks[hf]"
    python examples/hf_causal_lm.py                 # CPU or the first GPU
    python examples/hf_causal_lm.py --steps 20 --vocab 128000

``torchblocks.patch(model)`` swaps the Linear layers for Dense blocks and
patches the forward: given ``labels`` in training, the next-token loss comes
from the last hidden states through ``dense_cross_entropy``, a chunk of rows
at a time, and the output's ``logits`` is None.
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

import torchblocks
from torchblocks.hf import causal_lm_loss


def tiny_llama(vocab: int, hidden: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device)


def peak_bytes(compute, device: str) -> int:
    """Peak bytes allocated while ``compute()`` runs, above what was live before."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        compute()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # the CPU allocator keeps no statistics: replay the profiler's memory
    # timeline (what its export_memory_timeline draws), allocations and frees in order
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as profiler:
        compute()
    live = peak = 0
    for _, action, _, size in profiler._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def native_loss(hidden, weight, labels):
    """What the unpatched model computes from its last hidden state."""
    logits = F.linear(hidden, weight).float()
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    native = tiny_llama(args.vocab, args.hidden, args.device)
    ours = torchblocks.patch(copy.deepcopy(native))
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (native, ours)]
    generator = torch.Generator().manual_seed(1)
    print(f"tiny Llama, vocab {args.vocab}, hidden {args.hidden}, batch {args.batch} x {args.seq} tokens, "
          f"on {args.device}")
    print(f"{'step':>4}  {'native loss':>12}  {'torchblocks loss':>16}")
    for step in range(args.steps):
        input_ids = torch.randint(args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
        losses = []
        for model, optimizer in zip((native, ours), optimizers):
            optimizer.zero_grad()
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"{step:>4}  {losses[0]:>12.6f}  {losses[1]:>16.6f}")

    hidden = torch.randn(args.batch, args.seq, args.hidden, device=args.device, requires_grad=True)
    weight = ours.lm_head.weight
    labels = torch.randint(args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
    logits_bytes = args.batch * args.seq * args.vocab * 4
    print(f"\nthe loss from the last hidden state, forward and backward "
          f"(float32 logits would be {logits_bytes / 2**20:.1f} MiB):")
    for name, loss_of in (("native", native_loss), ("torchblocks", causal_lm_loss)):
        peak = peak_bytes(lambda: loss_of(hidden, weight, labels).backward(), args.device)
        print(f"  {name:<12} peak {peak / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
