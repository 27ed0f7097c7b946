"""``torchblocks.patch``: swap the blocks into an existing model, in place.

Modules are replaced by their twins, holding the very same ``Parameter``
objects. A Linear whose only consumer is a ReLU (read from a ``torch.fx``
trace of their parent's forward, with the children as leaves) becomes one
``Dense(activation="relu")`` and the ReLU an ``nn.Identity``. A Hugging Face
model's forward gets the losses it builds inside routed to the blocks, and a
causal language model's next-token loss runs from the hidden states through
``dense_cross_entropy`` (``torchblocks.hf``).
"""

import dataclasses
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

from torchblocks.nn import Dense, ReLU, SoftmaxCrossEntropy

__all__ = ["Change", "patch"]


@dataclasses.dataclass
class Change:
    """One line of ``patch``'s report: the module at ``name`` (its type
    ``kind``) became ``result``, or was left alone, because ``why``."""

    name: str
    kind: str
    result: str
    why: str = ""


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _why_not_dense(module: nn.Module) -> Optional[str]:
    """Why a Linear (or subclass) cannot become a Dense (None: it can). A
    subclass qualifies when it computes what nn.Linear computes: the same
    forward, and no state beyond weight and bias."""
    if _has_hooks(module):
        return "has hooks, which a replacement would lose"
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} overrides forward"
    if set(module._parameters) != {"weight", "bias"} or module._buffers or module._modules:
        return f"{type(module).__name__} holds more than weight and bias"
    return None


def _replacement(module: nn.Module):
    """(the torchblocks twin of ``module`` or None, why it was left alone).
    Modules with hooks are kept (the hooks would be lost), and subclasses of
    ReLU and CrossEntropyLoss (they may rely on more than the forward)."""
    if isinstance(module, nn.Linear):
        why = _why_not_dense(module)
        return (Dense.from_linear(module), "") if why is None else (None, why)
    if isinstance(module, (nn.ReLU, nn.CrossEntropyLoss)):
        if _has_hooks(module):
            return None, "has hooks, which a replacement would lose"
        if type(module) is nn.ReLU:
            return ReLU(inplace=module.inplace).train(module.training), ""
        if type(module) is nn.CrossEntropyLoss:
            return SoftmaxCrossEntropy(module.weight, module.ignore_index, module.reduction,
                                       module.label_smoothing).train(module.training), ""
        return None, f"a subclass, {type(module).__name__}"
    return None, ""


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call is one node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _relu_consumers(parent: nn.Module) -> Dict[str, str]:
    """{Linear child's name: ReLU child's name} for each Linear of ``parent``
    whose output goes to that ReLU and nowhere else, each called once.
    Raises whatever torch.fx raises when the forward cannot be traced."""
    children = parent._modules
    graph = _ChildrenAsLeaves().trace(parent)
    calls = [node for node in graph.nodes if node.op == "call_module"]
    times_called = {name: sum(node.target == name for node in calls) for name in children}
    fusions = {}
    for node in calls:
        linear = children.get(node.target)
        if not isinstance(linear, nn.Linear) or _why_not_dense(linear) or times_called[node.target] != 1:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        relu = children.get(users[0].target)
        if type(relu) is nn.ReLU and not _has_hooks(relu) and times_called[users[0].target] == 1:
            fusions[node.target] = users[0].target
    return fusions


def _patch(module: nn.Module, prefix: str, changes: List[Change]) -> nn.Module:
    replacement, why = _replacement(module)
    if replacement is not None or why:
        changes.append(Change(prefix or "(model)", type(module).__name__,
                              type(replacement).__name__ if replacement is not None else "left alone", why))
        return replacement if replacement is not None else module
    children = module._modules
    fusions = {}
    kinds = [type(child) for child in children.values()]
    if any(issubclass(kind, nn.Linear) for kind in kinds) and nn.ReLU in kinds:
        try:
            fusions = _relu_consumers(module)
        except Exception as error:  # noqa: BLE001  (torch.fx raises many types for an untraceable forward)
            changes.append(Change(prefix or "(model)", type(module).__name__, "not fused",
                                  f"its forward cannot be traced by torch.fx ({type(error).__name__})"))
    fused_relus = {relu: linear for linear, relu in fusions.items()}
    for name, child in list(children.items()):
        qualified = f"{prefix}.{name}" if prefix else name
        if name in fusions:
            children[name] = Dense.from_linear(child, activation="relu")
            changes.append(Change(qualified, type(child).__name__, "Dense(relu)",
                                  f"its only consumer is {fusions[name]}"))
        elif name in fused_relus:
            children[name] = nn.Identity()
            changes.append(Change(qualified, type(child).__name__, "Identity", f"fused into {fused_relus[name]}"))
        elif child is not None:
            children[name] = _patch(child, qualified, changes)
    return module


def _format(changes: List[Change]) -> str:
    rows = [("module", "type", "now", "why")] + [(c.name, c.kind, c.result, c.why) for c in changes]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
                     for row in rows).rstrip()


def patch(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Swap torchblocks blocks into ``model``, in place and recursively.

    Every ``nn.Linear`` (and subclass that neither overrides ``forward`` nor
    holds more than weight and bias) becomes a ``Dense``, every ``nn.ReLU`` a
    ``ReLU`` and every ``nn.CrossEntropyLoss`` a ``SoftmaxCrossEntropy``,
    keeping the very same ``Parameter`` objects (an optimizer built before
    the patch still trains the model, tied weights stay tied) and every
    hyperparameter. A Linear whose output goes only to a ReLU module (seen in
    a ``torch.fx`` trace of their parent, ``nn.Sequential`` or not) becomes one
    ``Dense(activation="relu")`` and the ReLU's slot an ``nn.Identity``.
    Modules with hooks and other subclasses are left as they are.

    A Hugging Face model (``transformers``) also gets its forward patched:
    a causal language model given ``labels`` in training computes the
    next-token loss from the hidden states with ``dense_cross_entropy`` and
    returns ``logits=None`` (see ``torchblocks.hf``); any other model runs its
    forward under ``torchblocks.enabled()``, which routes the losses it
    builds inside (``CrossEntropyLoss()``, ``F.cross_entropy``) to the blocks.

    Args:
        model: any module.
        verbose: print what was replaced, and what was left alone and why.

    Returns:
        ``model`` (patched), or its replacement if ``model`` itself is one of
        the replaced types.

    Example::

        >>> net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
        >>> torchblocks.patch(net, verbose=True)  # Dense(relu), Identity, Dense
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    changes: List[Change] = []
    patched = _patch(model, "", changes)
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(patched, transformers.PreTrainedModel):
        from torchblocks import hf

        changes.append(hf.patch_forward(patched))
    if verbose:
        print(_format(changes))
    return patched
