"""Adam and AdamW, as torch.optim.Adam and torch.optim.AdamW. AdamW is Adam
with decoupled weight decay: one update rule, one flag."""

import torch

from torchblocks._ops._dispatch import kernels
from torchblocks.optim._multi_tensor import (
    MultiTensorOptimizer,
    check_beta_range,
    check_beta_types,
    check_capturable_devices,
    check_fused_flags,
    check_non_negative,
    check_tensor_hyperparameter,
    saved,
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
        differentiable: autograd records the step, as in torch.optim: the
            parameters are tensors computed from leaves (a leaf that requires
            grad raises a RuntimeError, before anything is written), and the
            gradient of a later computation flows through every step into
            them, their gradients and state, and into ``lr``, the betas and
            ``weight_decay`` given as tensors that require grad. The step is
            then the foreach reference, one tensor at a time, on every
            backend, its bias corrections computed from the ``step`` tensors
            in their dtype, as torch.optim's differentiable step computes
            them. foreach=True refuses it with an AssertionError, and
            fused=True with a RuntimeError, as in torch.optim.

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
        # one-element tensors of any rank become 0-dim ones, as torch.optim.Adam keeps them
        betas = tuple(beta.squeeze() if isinstance(beta, torch.Tensor) and beta.dim() else beta for beta in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def _sparse_gradient_error(self, group):
        return "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _update(self, group, params):
        amsgrad, capturable, differentiable = group["amsgrad"], group["capturable"], group["differentiable"]
        if differentiable and any(getattr(self.state[p].get("step"), "requires_grad", False) for p in params):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")  # torch's words
        steps = self._advance_steps(params, ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else []),
                                    capturable)
        if capturable and not torch.compiler.is_compiling():
            check_capturable_devices(params, steps, supports_xla=False)
        if not (capturable or differentiable):  # both take the bias corrections from the step tensors
            steps = self._read_steps(steps)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        # tensor hyperparameters: capturable reads them on the device, never with float(); differentiable
        # records the step through them
        tensors = (capturable or differentiable) and any(isinstance(v, torch.Tensor) for v in (lr, beta1, beta2))
        if not tensors:
            lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
        states = [self.state[p] for p in params]
        self._apply(
            adam_reference, None if tensors else kernels.optim.adam_step, None if capturable else "adam_step",
            dict(params=params, grads=[p.grad for p in params], exp_avgs=[s["exp_avg"] for s in states],
                 exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                 max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else None),
            dict(steps=steps), differentiable=differentiable,
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
                   weight_decay, decoupled_weight_decay, amsgrad, maximize, capturable=False, differentiable=False):
    """The Adam update (the class docstring) with ``torch._foreach_*`` ops, on
    lists of same-device, same-dtype tensors. ``steps[i]``: tensor i's step
    count t, already advanced: a float, or with ``capturable`` or
    ``differentiable`` its step tensor, from which the bias corrections are
    computed in its dtype, on the device, in the order of torch.optim's
    single-tensor step (``lr``, the betas and a ``weight_decay`` may then be
    one-element tensors there too). ``differentiable``: autograd records the
    step, through those tensors too where they require grad (``saved``
    copies what its backward reads)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        elif isinstance(weight_decay, torch.Tensor):  # g + weight_decay * p: its gradient too
            grads = torch._foreach_add(grads, torch._foreach_mul(saved(params, differentiable), weight_decay))
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # a tensor beta goes to the overloads that take tensors: autograd sees it, and nothing is read on the host
    if isinstance(beta1, torch.Tensor):
        torch._foreach_lerp_(exp_avgs, grads, [1 - beta1] * len(grads))
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    if isinstance(beta2, torch.Tensor):
        torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, 1 - beta2), grads)
    else:
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, saved(exp_avg_sqs, differentiable))
        exp_avg_sqs = max_exp_avg_sqs
    if not (capturable or differentiable):
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**step) for step in steps])
        return
    # p <- p + m / (sqrt(v) / (sqrt(1 - beta2^t) * -s) + eps / -s), s = lr / (1 - beta1^t): torch.optim's
    # single-tensor step, each scalar in the step tensors' dtype (a tensor lr's, where it is wider)
    powers = (torch._foreach_pow([beta] * len(steps) if isinstance(beta, torch.Tensor) else beta,
                                 saved(steps, differentiable)) for beta in (beta1, beta2))
    bias_corrections1, bias_corrections2_sqrt = (torch._foreach_add(torch._foreach_neg(power), 1) for power in powers)
    torch._foreach_sqrt_(bias_corrections2_sqrt)
    if isinstance(lr, torch.Tensor):
        negative_step_sizes = torch._foreach_div([lr] * len(steps), bias_corrections1)
    else:  # torch's `lr / tensor`: a reciprocal, then a product
        negative_step_sizes = torch._foreach_mul(torch._foreach_reciprocal(bias_corrections1), lr)
    torch._foreach_neg_(negative_step_sizes)
    denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs),
                               torch._foreach_mul(bias_corrections2_sqrt, negative_step_sizes))
    torch._foreach_add_(denom, torch._foreach_mul(torch._foreach_reciprocal(negative_step_sizes), eps))
    torch._foreach_addcdiv_(params, saved(exp_avgs, differentiable), denom)
