"""Hugging Face models after torchblocks.patch: tiny Llama, GPT-2 and BERT
built from configs (random weights, no download). Their losses run through the
blocks and match the unpatched model, parameter by parameter and over
AdamW steps; a causal LM's loss never holds the (tokens, vocab) logits."""

import copy

import pytest
import torch

import torchblocks
from torchblocks._ops import _eager_cpu
from torchblocks.testing import Allocations, assert_close

transformers = pytest.importorskip("transformers")

BATCH, SEQ, VOCAB, HIDDEN = 2, 128, 2048, 32


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def patched_and_native(build):
    torch.manual_seed(0)
    native = build()
    model = copy.deepcopy(native)
    torchblocks.patch(model)
    return model, native


def token_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(VOCAB, (BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, :10] = -100  # a prompt that counts for nothing
    return input_ids, labels


def batch_for(build):
    """(input_ids, labels) for the model ``build`` makes."""
    if build is bert:
        return torch.randint(100, (4, 16), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 1, 2])
    return token_batch()


def assert_same_gradients(model, native):
    native_parameters = dict(native.named_parameters())
    for name, parameter in model.named_parameters():
        if name.endswith("key.bias"):  # zero, as softmax ignores a shift of a row's scores: rounding noise
            assert parameter.grad.abs().max() < 1e-9 and native_parameters[name].grad.abs().max() < 1e-9
            continue
        assert_close(parameter.grad, native_parameters[name].grad, what=f"gradient of {name}")


@pytest.mark.parametrize("build", [llama, gpt2])
def test_causal_lm_loss_is_fused_and_matches(build):
    model, native = patched_and_native(build)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    input_ids, labels = token_batch()
    with Allocations() as ours:
        output = model(input_ids, labels=labels)
        output.loss.backward()
    with Allocations() as theirs:
        expected = native(input_ids, labels=labels)
        expected.loss.backward()
    assert output.logits is None
    assert type(output.loss.grad_fn).__name__ == "DenseCrossEntropyFunctionBackward"
    assert_close(output.loss, expected.loss, what="loss")
    assert_same_gradients(model, native)
    all_logits = BATCH * SEQ * VOCAB
    assert theirs.largest >= all_logits, "the native run holds all the logits: the measure can see them"
    assert ours.largest < all_logits, f"largest tensor {ours.largest} elements, all the logits are {all_logits}"


def test_causal_lm_num_items_in_batch_and_tuple_output():
    model, native = patched_and_native(llama)
    input_ids, labels = token_batch()
    items = torch.tensor(100)
    loss, *_ = model(input_ids, labels=labels, num_items_in_batch=items, return_dict=False)
    assert_close(loss, native(input_ids, labels=labels, num_items_in_batch=items).loss, what="loss")


def test_causal_lm_without_labels_or_in_eval_returns_logits():
    model, native = patched_and_native(llama)
    input_ids, labels = token_batch()
    assert_close(model(input_ids).logits, native(input_ids).logits, what="logits")
    model.eval()
    native.eval()
    output = model(input_ids, labels=labels)
    assert_close(output.logits, native(input_ids, labels=labels).logits, what="logits")


@pytest.mark.parametrize("build", [llama, bert])
def test_adamw_steps_match(build):
    model, native = patched_and_native(build)
    input_ids, labels = batch_for(build)
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-3) for net in (model, native)]
    for _ in range(5):
        for net, optimizer in zip((model, native), optimizers):
            optimizer.zero_grad()
            net(input_ids, labels=labels).loss.backward()
            optimizer.step()
    native_parameters = dict(native.named_parameters())
    for name, parameter in model.named_parameters():
        if name.endswith("key.bias"):
            # its gradient is zero (softmax ignores a shift of a row's scores):
            # AdamW normalises rounding noise into steps, on both sides
            continue
        assert_close(parameter, native_parameters[name], what=f"{name} after 5 AdamW steps")


def test_bert_loss_built_inside_forward_runs_as_a_block():
    model, native = patched_and_native(bert)
    input_ids, labels = batch_for(bert)
    with torch.profiler.profile() as profiler:
        loss = model(input_ids, labels=labels).loss
    loss.backward()
    expected = native(input_ids, labels=labels).loss
    expected.backward()
    events = {event.name for event in profiler.events()}
    # the loss's op: the compiled module's kernels serve torchblocks::cross_entropy; the Python Function's forward
    # calls its own op
    loss_op = "torchblocks::cross_entropy" if _eager_cpu.module() else "torchblocks::cross_entropy_forward"
    assert loss_op in events and "torchblocks::dense" in events
    assert not {"aten::nll_loss", "aten::nll_loss_nd", "aten::_log_softmax", "aten::linear"} & events
    assert_close(loss, expected, what="loss")
    assert_same_gradients(model, native)


@pytest.mark.parametrize("build", [llama, bert])
def test_compiles(build):
    model, _ = patched_and_native(build)
    input_ids, labels = batch_for(build)
    eager = model(input_ids, labels=labels).loss
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")(input_ids, labels=labels).loss
    assert_close(compiled, eager, what="compiled loss")


def test_models_outside_the_fused_families_run_under_the_override(capsys):
    torch.manual_seed(0)
    model = bert()
    torchblocks.patch(model, verbose=True)
    torchblocks.patch(model, verbose=True)  # a second patch changes nothing
    report = capsys.readouterr().out
    assert "BertForSequenceClassification  under enabled()" in report
    assert "already patched" in report


def test_example_trains_and_reports_the_loss_memory(monkeypatch, capsys):
    import importlib.util
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "hf_causal_lm.py")
    spec = importlib.util.spec_from_file_location("hf_causal_lm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr("sys.argv", ["hf_causal_lm.py", "--steps", "2", "--vocab", "4096", "--seq", "256"])
    example.main()
    out = capsys.readouterr().out
    steps = re.findall(r"^\s+\d+\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert len(steps) == 2 and all(abs(float(a) - float(b)) < 1e-4 for a, b in steps), out
    peaks = dict(re.findall(r"^\s+(native|torchblocks)\s+peak\s+([\d.]+) MiB$", out, re.MULTILINE))
    # float32 logits are 4 x 256 x 4096 x 4 B = 16 MiB; native holds them, their log-softmax and gradient
    assert float(peaks["native"]) >= 3 * 16 and float(peaks["torchblocks"]) < 16, out


def test_transformers_is_imported_only_when_used():
    import subprocess
    import sys

    code = ("import sys, torch, torchblocks; torchblocks.patch(torch.nn.Linear(2, 2)); "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
