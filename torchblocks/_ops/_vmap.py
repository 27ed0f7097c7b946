"""The vmap rules of the blocks' autograd Functions, for ``torch.func.vmap``
(and ``jacrev``, per-sample gradients: anything that batches a Function).

A rule gets the physical tensors, each with its batch dimension ``in_dims[i]``
(None where unbatched), and returns ``(outputs, out_dims)``. Two rules serve
every block:
    fold_rows   for a row-wise Function whose batched arguments all carry the
                rows: (B, R, ...) becomes (B * R, ...), one call, unfolded after;
    by_loop     for any other batching (e.g. per-sample weights): one call per
                batch entry on views of it, outputs stacked.
"""

import torch


def batched(tensor) -> bool:
    """Whether ``tensor`` (a gradient arriving in a backward) carries a batch:
    under a torch.func transform, or the legacy vmap of
    ``jacobian(vectorize=True)`` and gradcheck's batched check. A buffer held
    from the forward cannot then be scaled by it in place."""
    if torch.compiler.is_compiling():  # a compiled backward sees fake tensors, never a batch
        return False
    return torch._C._are_functorch_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(tensor)


def batch_first(tensor, dim, batch_size):
    """``tensor`` with its batch dimension moved to the front, or expanded to
    one (stride 0, no copy) when it has none."""
    if dim is None:
        return tensor.expand(batch_size, *tensor.shape)
    return tensor.movedim(dim, 0)


def by_loop(apply, info, in_dims, *args):
    """Call ``apply`` (a Function's apply, or an op) on each entry of the batch and stack the results.
    Arguments are selected, not copied: a Function that writes into an input
    writes into the caller's tensor."""
    results = []
    for index in range(info.batch_size):
        entry = [arg.select(dim, index) if dim is not None else arg for arg, dim in zip(args, in_dims)]
        results.append(apply(*entry))
    if isinstance(results[0], tuple):  # a None output (nothing to return) stays None, unbatched
        outputs = tuple(None if entries[0] is None else torch.stack(entries) for entries in zip(*results))
        return outputs, tuple(None if output is None else 0 for output in outputs)
    return torch.stack(results), 0


def fold_rows(apply, info, in_dims, args, row_args):
    """Call a row-wise ``apply`` (a Function's apply, or an op) once on the
    batch folded into its rows.

    ``row_args`` are the positions of the arguments whose dim 0 is the rows;
    any other argument that is batched sends the call to ``by_loop``. The
    outputs' dim 0 must be the rows too."""
    if any(dim is not None for index, dim in enumerate(in_dims) if index not in row_args):
        return by_loop(apply, info, in_dims, *args)
    batch = info.batch_size
    folded = list(args)
    for index in row_args:
        if args[index] is not None:
            rows_first = batch_first(args[index], in_dims[index], batch)
            folded[index] = rows_first.reshape(batch * rows_first.shape[1], *rows_first.shape[2:])
    results = apply(*folded)

    def unfold(output):
        if output is None:  # nothing to return: stays None, unbatched
            return None
        return output.reshape(batch, output.shape[0] // batch if batch else 0, *output.shape[1:])

    if isinstance(results, tuple):
        return tuple(unfold(output) for output in results), tuple(None if r is None else 0 for r in results)
    return unfold(results), 0
