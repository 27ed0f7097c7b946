"""Hugging Face models: the next-token loss without the ``(tokens, vocab)`` logits.

A ``transformers`` causal LM computes ``logits = lm_head(hidden_states)``, all
``tokens x vocab`` of them, then the cross-entropy of the shifted labels. With
``dense_cross_entropy`` the same loss comes straight from the hidden states
and the head's weight, a chunk of rows at a time. transformers is an optional
extra (``pip install torchblocks[hf]``), imported only here, only when used.
"""

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from torchblocks import functional
from torchblocks._validate import IGNORE_INDEX
from torchblocks.override import enabled

__all__ = ["FUSED_MODEL_TYPES", "causal_lm_loss", "patch_forward"]

# Model families whose causal LM computes logits = lm_head(last hidden state)
# and nothing more (no soft-capping, scaling or auxiliary loss).
FUSED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")

# config attributes that change the logits after lm_head, in other families
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")

_PATCHED = "_torchblocks_forward"


def causal_lm_loss(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                   head_bias: Optional[torch.Tensor] = None, *, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hugging Face's causal LM loss (``ForCausalLMLoss``) from the hidden
    states: position t predicts label t + 1, ``ignore_index`` labels count for
    nothing, and the sum is divided by ``num_items_in_batch`` when given (by
    the number of counted labels otherwise). The logits are never all in memory.

    Args:
        hidden_states: ``(batch, seq, hidden)``, the base model's last hidden state.
        head_weight: ``(vocab, hidden)``, the ``lm_head``'s weight.
        labels: ``(batch, seq)`` token ids (unshifted), or ``ignore_index``.
        head_bias: ``(vocab,)`` or None.
        num_items_in_batch: the divisor of the summed loss (int or tensor), or None.
        ignore_index: the label that counts for nothing.
        shift_labels: ``(batch, seq)`` labels already shifted; replaces ``labels``.

    Returns:
        The loss, a float32 scalar (Hugging Face upcasts the logits).

    Example::

        >>> hidden = model.model(input_ids).last_hidden_state
        >>> loss = torchblocks.hf.causal_lm_loss(hidden, model.lm_head.weight, input_ids)
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_states.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = functional.dense_cross_entropy(hidden_states, head_weight, shift_labels, head_bias, ignore_index,
                                          reduction).float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _why_not_fused(model) -> Optional[str]:
    """Why ``model``'s loss cannot be computed by ``causal_lm_loss`` (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(FUSED_MODEL_TYPES)}"
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return f"{type(model).__name__} is not a causal LM"
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) \
            or getattr(head, "activation", None) is not None:
        return "it has no lm_head with a weight"
    if model.base_model is model:
        return "it has no base model to return the hidden states"
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, False, 1, 1.0)]
    if transforms:
        return f"its config transforms the logits ({', '.join(transforms)})"
    return None


def _fused_loss_forward(model, forward):
    """``forward`` of a causal LM, except that with ``labels`` in training the
    loss comes from ``causal_lm_loss`` and the output's logits are None."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    signature = inspect.signature(forward)
    var_keyword = next((name for name, parameter in signature.parameters.items()
                        if parameter.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(forward)
    def fused(*args, **kwargs):
        if kwargs.get("labels") is None or not model.training:
            return forward(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop(var_keyword, {}))
        labels = arguments.pop("labels")
        arguments.pop("logits_to_keep", None)
        return_dict = arguments.pop("return_dict", None)
        # the loss's own keywords, which a base model may not take (transformers 4.46's Llama does not)
        loss_options = {name: arguments.pop(name) for name in ("num_items_in_batch", "ignore_index", "shift_labels")
                        if name in arguments}
        outputs = model.base_model(**arguments)
        head = model.get_output_embeddings()
        loss = causal_lm_loss(outputs.last_hidden_state, head.weight, labels, getattr(head, "bias", None),
                              num_items_in_batch=loss_options.get("num_items_in_batch"),
                              ignore_index=loss_options.get("ignore_index", IGNORE_INDEX),
                              shift_labels=loss_options.get("shift_labels"))
        kind = CausalLMOutputWithCrossAttentions if "cross_attentions" in outputs.__dataclass_fields__ \
            else CausalLMOutputWithPast
        fields = {name: value for name, value in outputs.items()
                  if name in kind.__dataclass_fields__ and name != "last_hidden_state"}
        result = kind(loss=loss, logits=None, **fields)
        return result.to_tuple() if return_dict is False else result

    setattr(fused, _PATCHED, True)
    return fused


def _forward_under_override(forward):
    """``forward``, run under ``torchblocks.enabled()``."""

    @functools.wraps(forward)
    def routed(*args, **kwargs):
        with enabled():
            return forward(*args, **kwargs)

    setattr(routed, _PATCHED, True)
    return routed


def patch_forward(model):
    """Patch the forward of a ``transformers`` model (``torchblocks.patch``
    calls it): a causal LM of ``FUSED_MODEL_TYPES`` given ``labels`` in
    training computes its loss with ``causal_lm_loss`` and returns
    ``logits=None``; any other model runs its forward under
    ``torchblocks.enabled()``, so the losses built inside reach the blocks.

    Args:
        model: a ``transformers.PreTrainedModel``; patched in place, once.

    Returns:
        the ``torchblocks.patching.Change`` saying what was done and why.

    Example::

        >>> model = LlamaForCausalLM(LlamaConfig(...))
        >>> torchblocks.hf.patch_forward(model)
        >>> model(input_ids, labels=input_ids).loss   # no (tokens, vocab) logits
    """
    from torchblocks.patching import Change

    name = type(model).__name__
    if getattr(model.forward, _PATCHED, False):
        return Change("(forward)", name, "left alone", "already patched")
    why_not = _why_not_fused(model)
    if why_not is None:
        model.forward = _fused_loss_forward(model, model.forward)
        return Change("(forward)", name, "fused loss",
                      "labels in training: dense_cross_entropy from the hidden states, logits=None")
    model.forward = _forward_under_override(model.forward)
    return Change("(forward)", name, "under enabled()", f"losses built inside reach the blocks; not fused: {why_not}")
