"""Adam and AdamW, as torch.optim.Adam and torch.optim.AdamW. AdamW is Adam
with decoupled weight decay: one update rule, one flag."""

import torch

from torchblocks._ops._dispatch import kernels
from torchblocks.optim._multi_tensor import (
    MultiTensorOptimizer,
    check_beta_range,
    check_beta_types,
    check_capturable_devices,
    check_differentiable,
    check_fused_flags,
    check_non_negative,
    check_tensor_hyperparameter,
)


class Adam(MultiTensorOptimizer):
    r"""Adam, a drop-in for ``torch.optim.Adam``: the same arguments, defaults,
    update and state (``step``, ``exp_avg``, ``exp_avg_sq``, and
    ``max_exp_avg_sq`` with amsgrad).

    Complex parameters are stepped as their real view (real and imaginary
    parts as two real numbers, so v holds re(g)^2 and im(g)^2), with complex
    state, as torch.optim keeps it. A sparse gradient raises torch.optim.Adam's
    RuntimeError (AdamW's too), before the group is written.

    Update, for each parameter p with gradient g at step t (m, v, v_max start at 0)::

        g <- -g                                     if maximize
        p <- p * (1 - lr * weight_decay)            if decoupled_weight_decay (AdamW)
        g <- g + weight_decay * p                   otherwise, if weight_decay != 0
        m <- m + (1 - beta1) * (g - m)
        v <- beta2 * v + (1 - beta2) * g^2
        v_max <- max(v_max, v); v <- v_max          if amsgrad
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        params: an iterable of parameters, named parameters or param-group dicts.
        lr: learning rate (float or one-element tensor), default 1e-3.
        betas: (beta1, beta2), the decay rates of m and v, default (0.9, 0.999).
        eps: added to the denominator, default 1e-8.
        weight_decay: default 0 (1e-2 for AdamW).
        amsgrad: divide by the running maximum of v.
        maximize: ascend the objective instead.
        decoupled_weight_decay: decay the parameters directly (AdamW).
        capturable: keep ``step`` on the parameters' device and compute the
            bias corrections there, never reading a device value on the host,
            so that the step can be captured in a CUDA graph; ``lr`` and the
            betas may then be tensors on that device.
        foreach, fused: accepted for drop-in use and kept in the state dict; the
            step is always torchblocks' multi-tensor step, chosen by the backend.
        differentiable: must be False.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torchblocks.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        check_tensor_hyperparameter("lr", lr, foreach, capturable)
        check_non_negative(lr, "learning rate")
        check_non_negative(eps, "epsilon value")
        check_beta_range(betas)
        check_non_negative(weight_decay, "weight_decay value")
        check_beta_types(betas, foreach, capturable)
        check_fused_flags(fused, foreach, differentiable)
        check_differentiable(type(self).__name__, differentiable)
        # one-element tensors of any rank become 0-dim ones, as torch.optim.Adam keeps them
        betas = tuple(beta.squeeze() if isinstance(beta, torch.Tensor) and beta.dim() else beta for beta in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def _sparse_gradient_error(self, group):
        return "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _update(self, group, params):
        amsgrad, capturable = group["amsgrad"], group["capturable"]
        steps = self._advance_steps(params, ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else []),
                                    capturable)
        if capturable and not torch.compiler.is_compiling():
            check_capturable_devices(params, steps, supports_xla=False)
        if not capturable:
            steps = self._read_steps(steps)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        # capturable tensor hyperparameters are read on the device, never with float()
        on_device = capturable and any(isinstance(value, torch.Tensor) for value in (lr, beta1, beta2))
        if not on_device:
            lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
        states = [self.state[p] for p in params]
        self._apply(
            adam_reference, None if on_device else kernels.optim.adam_step, None if capturable else "adam_step",
            dict(params=params, grads=[p.grad for p in params], exp_avgs=[s["exp_avg"] for s in states],
                 exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                 max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else None),
            dict(steps=steps),
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad, maximize=group["maximize"],
            capturable=capturable,
        )

class AdamW(Adam):
    r"""AdamW, a drop-in for ``torch.optim.AdamW``: Adam (its docstring has the
    update) with ``decoupled_weight_decay=True`` and weight_decay 1e-2 by default.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torchblocks.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a state dict saved by Adam loads as AdamW, as torch.optim.AdamW does
            group["decoupled_weight_decay"] = True


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                   weight_decay, decoupled_weight_decay, amsgrad, maximize, capturable=False):
    """The Adam update (the class docstring) with ``torch._foreach_*`` ops, on
    lists of same-device, same-dtype tensors. ``steps[i]``: tensor i's step
    count t, already advanced: a float, or with ``capturable`` its step
    tensor, from which the bias corrections are computed on the device
    (``lr`` and the betas may then be one-element tensors there too)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        exp_avg_sqs = max_exp_avg_sqs
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if not capturable:
        torch._foreach_div_(denom, [(1 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**step) for step in steps])
        return
    bias_corrections2_sqrt = torch._foreach_pow(beta2, steps)  # -> sqrt(1 - beta2^t)
    torch._foreach_neg_(bias_corrections2_sqrt)
    torch._foreach_add_(bias_corrections2_sqrt, 1)
    torch._foreach_sqrt_(bias_corrections2_sqrt)
    torch._foreach_div_(denom, bias_corrections2_sqrt)
    torch._foreach_add_(denom, eps)
    step_sizes = torch._foreach_pow(beta1, steps)  # -> lr / (1 - beta1^t)
    torch._foreach_neg_(step_sizes)
    torch._foreach_add_(step_sizes, 1)
    torch._foreach_reciprocal_(step_sizes)
    torch._foreach_mul_(step_sizes, lr)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_sub_(params, updates)
