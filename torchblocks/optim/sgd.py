"""Stochastic gradient descent, with momentum, as torch.optim.SGD."""

import torch

from torchblocks._ops._dispatch import kernels
from torchblocks.optim._multi_tensor import (
    MultiTensorOptimizer,
    check_fused_flags,
    check_non_negative,
    check_tensor_hyperparameter,
    saved,
)


class SGD(MultiTensorOptimizer):
    r"""Stochastic gradient descent (optionally with momentum), a drop-in for
    ``torch.optim.SGD``: the same arguments, defaults, update and state
    (``momentum_buffer``, only when ``momentum != 0``).

    Complex parameters are stepped as their real view (real and imaginary
    parts as two real numbers), with a complex ``momentum_buffer``, as
    torch.optim keeps it. Sparse gradients (``nn.Embedding(sparse=True)``)
    are stepped as torch.optim.SGD steps them, by the foreach reference,
    and the momentum buffer a sparse gradient starts is sparse, as torch's
    is. As in torch.optim.SGD, a sparse gradient with ``weight_decay != 0``
    or ``fused=True`` raises a RuntimeError, before the group is written.

    Update, for each parameter p with gradient g at step t::

        g <- -g                              if maximize
        g <- g + weight_decay * p            if weight_decay != 0
        if momentum != 0:
            b <- g                           at t = 1
            b <- momentum * b + (1 - dampening) * g    otherwise
            g <- g + momentum * b            if nesterov, else g <- b
        p <- p - lr * g

    Args:
        params: an iterable of parameters, named parameters or param-group dicts.
        lr: learning rate (float or one-element tensor), default 1e-3.
        momentum, dampening, weight_decay: as above, default 0.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening == 0).
        maximize: ascend the objective instead.
        foreach, fused: accepted for drop-in use and kept in the state dict; the
            step is always torchblocks' multi-tensor step, chosen by the backend.
        differentiable: autograd records the step, as in torch.optim: the
            parameters are tensors computed from leaves (a leaf that requires
            grad raises a RuntimeError, before anything is written), and the
            gradient of a later computation flows through every step into
            them, their gradients and momentum buffers, and into ``lr`` and
            ``weight_decay`` given as tensors that require grad. The step is
            then the foreach reference, one tensor at a time, on every
            backend. As torch.optim.SGD's, the first momentum buffer is a
            detached copy of the gradient: nothing flows through it into that
            gradient. fused=True refuses it, as in torch.optim.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torchblocks.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()

    Through a step (differentiable=True): the parameter stepped is a copy of
    the leaf ``weight``, and a loss after the step has a gradient for it::

        >>> weight = torch.randn(3, requires_grad=True)
        >>> param = weight.clone()
        >>> optimizer = torchblocks.optim.SGD([param], lr=0.1, momentum=0.9, differentiable=True)
        >>> param.grad = 2 * param.detach()
        >>> optimizer.step()
        >>> torch.autograd.grad(param.square().sum(), weight)

    With an embedding of sparse gradients (the (10, 3) weight gets a sparse
    gradient of two rows) beside a dense layer, in one group::

        >>> embedding, head = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)
        >>> optimizer = torchblocks.optim.SGD([*embedding.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
        >>> head(embedding(torch.tensor([1, 7]))).sum().backward()
        >>> optimizer.step()
    """

    # The reference makes one pass per op over the parameter, gradient and
    # buffer: batching saved no cache traffic and cost calls (10M parameters
    # in 1M-element batches: 0.91-0.97x torch's default step over five bench
    # runs; one batch: its ops).
    reference_batch_elements = None
    # torch.optim.SGD steps with differentiable=True through its foreach ops too (foreach=True)
    foreach_refuses_differentiable = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None):
        check_tensor_hyperparameter("lr", lr)
        check_non_negative(lr, "learning rate")
        check_non_negative(momentum, "momentum value")
        check_non_negative(weight_decay, "weight_decay value")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_fused_flags(fused, foreach, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults)

    def _sparse_gradient_error(self, group):
        if group["fused"]:
            return "`_fused_sgd` does not support sparse gradients"
        if group["weight_decay"] != 0:
            return (f"weight_decay={group['weight_decay']} adds the dense parameter to it, as in torch.optim.SGD: "
                    "add(sparse, dense) is not supported. Use add(dense, sparse) instead.")
        return None

    def _update(self, group, params):
        new_buffer = [False] * len(params)
        buffers = None
        if group["momentum"] != 0:
            buffers = []
            for i, param in enumerate(params):
                state = self.state[param]
                if state.get("momentum_buffer") is None:  # becomes the gradient: sparse for a sparse one
                    state["momentum_buffer"] = torch.empty_like(param.grad if param.grad.is_sparse else param)
                    new_buffer[i] = True
                buffers.append(state["momentum_buffer"])
        differentiable, lr = group["differentiable"], group["lr"]
        self._apply(
            sgd_reference, kernels.optim.sgd_step, "sgd_step",
            dict(params=params, grads=[p.grad for p in params], momentum_buffers=buffers), dict(new_buffer=new_buffer),
            differentiable=differentiable, lr=lr if differentiable and isinstance(lr, torch.Tensor) else float(lr),
            weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"],
        )


def sgd_reference(params, grads, momentum_buffers, new_buffer, *, lr, weight_decay, momentum, dampening, nesterov,
                  maximize, differentiable=False):
    """The SGD update (the class docstring) with ``torch._foreach_*`` ops, on
    lists of same-device, same-dtype tensors (the gradients, and momentum
    buffers they started, may be sparse). ``new_buffer[i]`` is True where
    ``momentum_buffers[i]`` is uninitialised: it becomes the gradient,
    detached, as torch.optim.SGD starts it. ``differentiable``: autograd
    records the step, through ``lr`` and ``weight_decay`` too where they are
    tensors that require grad (``saved`` copies what its backward reads)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if isinstance(weight_decay, torch.Tensor):  # g + weight_decay * p: its gradient too
            grads = torch._foreach_add(grads, torch._foreach_mul(saved(params, differentiable), weight_decay))
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        old = [i for i, new in enumerate(new_buffer) if not new]
        for i in (i for i, new in enumerate(new_buffer) if new):
            momentum_buffers[i].copy_(grads[i].detach())
        if old:
            old_buffers = [momentum_buffers[i] for i in old]
            torch._foreach_mul_(old_buffers, momentum)
            torch._foreach_add_(old_buffers, [grads[i] for i in old], alpha=1 - dampening)
        if nesterov:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
        else:
            grads = momentum_buffers
    if isinstance(lr, torch.Tensor):  # p - lr * g: its gradient too
        torch._foreach_sub_(params, torch._foreach_mul(saved(grads, differentiable), lr))
    else:
        torch._foreach_add_(params, grads, alpha=-lr)
