"""RMSprop, as torch.optim.RMSprop."""

import torch

from torchblocks._ops._dispatch import kernels
from torchblocks.optim._multi_tensor import (
    MultiTensorOptimizer,
    check_capturable_devices,
    check_non_negative,
    check_tensor_hyperparameter,
    saved,
)


class RMSprop(MultiTensorOptimizer):
    r"""RMSprop, a drop-in for ``torch.optim.RMSprop``: the same arguments,
    defaults, update and state (``step``, ``square_avg``, ``grad_avg`` when
    centered, ``momentum_buffer`` when momentum > 0).

    Complex parameters are stepped as their real view (real and imaginary
    parts as two real numbers, so v holds re(g)^2 and im(g)^2), with complex
    state, as torch.optim keeps it. A sparse gradient raises
    torch.optim.RMSprop's RuntimeError, before the group is written.

    Update, for each parameter p with gradient g (v, a, b start at 0)::

        g <- -g                                  if maximize
        g <- g + weight_decay * p                if weight_decay != 0
        v <- alpha * v + (1 - alpha) * g^2
        if centered:
            a <- a + (1 - alpha) * (g - a)
            d <- sqrt(v - a^2) + eps
        else:
            d <- sqrt(v) + eps
        if momentum > 0:
            b <- momentum * b + g / d
            p <- p - lr * b
        else:
            p <- p - lr * g / d

    Args:
        params: an iterable of parameters, named parameters or param-group dicts.
        lr: learning rate (float or one-element tensor), default 1e-2.
        alpha: smoothing constant of v (Keras's ``rho``), default 0.99.
        eps: added to the denominator, default 1e-8.
        weight_decay, momentum: as above, default 0.
        centered: divide by the estimated variance instead of the raw second moment.
        maximize: ascend the objective instead.
        capturable: keep ``step`` on the parameters' device and never read a
            device value on the host, so that the step can be captured in a
            CUDA graph; ``lr`` may then be a tensor on that device.
        foreach: accepted for drop-in use and kept in the state dict; the step is
            always torchblocks' multi-tensor step, chosen by the backend.
        differentiable: autograd records the step, as in torch.optim: the
            parameters are tensors computed from leaves (a leaf that requires
            grad raises a RuntimeError, before anything is written), and the
            gradient of a later computation flows through every step into
            them, their gradients and state (and into ``lr`` given as a
            tensor that requires grad, which torch.optim.RMSprop refuses).
            The step is then the foreach reference, one tensor at a time, on
            every backend. foreach=True refuses it with an AssertionError, as
            in torch.optim.

    Example::

        >>> model = torch.nn.Linear(784, 10)
        >>> optimizer = torchblocks.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
        >>> model(torch.rand(128, 784)).square().mean().backward()
        >>> optimizer.step()
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        check_tensor_hyperparameter("lr", lr)
        check_non_negative(lr, "learning rate")
        check_non_negative(eps, "epsilon value")
        check_non_negative(momentum, "momentum value")
        check_non_negative(weight_decay, "weight_decay value")
        check_non_negative(alpha, "alpha value")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults)

    def _update(self, group, params):
        momentum, centered, capturable = group["momentum"], group["centered"], group["capturable"]
        steps = self._advance_steps(params, ["square_avg"] + (["momentum_buffer"] if momentum > 0 else [])
                                    + (["grad_avg"] if centered else []), capturable)
        if capturable and not torch.compiler.is_compiling():
            check_capturable_devices(params, steps)
        lr, differentiable = group["lr"], group["differentiable"]
        # capturable: read on the device, not with float(); differentiable: autograd records the step through it
        tensor_lr = (capturable or differentiable) and isinstance(lr, torch.Tensor)
        states = [self.state[p] for p in params]
        launcher, compiled = (None, None) if tensor_lr else (kernels.optim.rmsprop_step, "rmsprop_step")
        self._apply(
            rmsprop_reference, launcher, compiled,
            dict(params=params, grads=[p.grad for p in params], square_avgs=[s["square_avg"] for s in states],
                 grad_avgs=[s["grad_avg"] for s in states] if centered else None,
                 momentum_buffers=[s["momentum_buffer"] for s in states] if momentum > 0 else None),
            {}, differentiable=differentiable,
            lr=lr if tensor_lr else float(lr), alpha=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"], momentum=momentum, centered=centered, maximize=group["maximize"],
        )


def rmsprop_reference(params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha, eps, weight_decay,
                      momentum, centered, maximize, differentiable=False):
    """The RMSprop update (the class docstring) with ``torch._foreach_*`` ops,
    on lists of same-device, same-dtype tensors. ``lr``: a float, or a
    one-element tensor on their device (capturable, or differentiable: then
    it may require grad). ``differentiable``: autograd records the step
    (``saved`` copies what its backward reads)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
    if centered:
        torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
        averages = saved(grad_avgs, differentiable)
        denom = torch._foreach_addcmul(square_avgs, averages, averages, value=-1)
        torch._foreach_sqrt_(denom)
    else:
        denom = torch._foreach_sqrt(square_avgs)
    if differentiable:  # the square root's backward keeps its result
        denom = torch._foreach_add(denom, eps)
    else:
        torch._foreach_add_(denom, eps)
    if momentum > 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_addcdiv_(momentum_buffers, grads, denom)
        if isinstance(lr, torch.Tensor):  # lr stays on the device (capturable) or in the graph (differentiable)
            torch._foreach_add_(params, torch._foreach_mul(saved(momentum_buffers, differentiable), -lr))
        else:
            torch._foreach_add_(params, momentum_buffers, alpha=-lr)
    elif isinstance(lr, torch.Tensor):
        torch._foreach_div_(denom, -lr)
        torch._foreach_addcdiv_(params, grads, denom)
    else:
        torch._foreach_addcdiv_(params, grads, denom, value=-lr)
