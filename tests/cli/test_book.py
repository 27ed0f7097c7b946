"""The book's first network (``torchblocks mnist``) and the from-scratch example, end to end on small data."""

import importlib.util
import io
import math
import os
import re
import types
import urllib.request

import pytest
import torch

import torchblocks
from torchblocks import cli
from torchblocks.cli import book
from torchblocks.cli.data import mnist
from torchblocks.testing import read_png, relative_error

from conftest import NO_CUDA

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and no directory named, so an empty default cache: the
    embedded digits stand in. Returns a directory the user could name."""
    def no_network(url, *args, **kwargs):
        raise OSError("network access is switched off in the tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("TORCHBLOCKS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return str(tmp_path / "no-mnist-here")


def embedded_digits():
    return mnist.load_directory(mnist.EMBEDDED_DIR, mnist.DIGITS)


def test_both_networks_start_from_keras_initialisation():
    ours, our_loss = book.build_network(784, native=False, seed=3)
    native, native_loss = book.build_network(784, native=True, seed=3)
    assert isinstance(our_loss, torchblocks.nn.SoftmaxCrossEntropy)
    assert isinstance(native_loss, torch.nn.CrossEntropyLoss)
    our_params = [p for p in ours.parameters()]
    native_params = [p for p in native.parameters()]
    assert [p.shape for p in our_params] == [(512, 784), (512,), (10, 512), (10,)]
    for mine, theirs in zip(our_params, native_params):
        assert torch.equal(mine, theirs)
    for weight, bias in zip(our_params[::2], our_params[1::2]):
        limit = math.sqrt(6 / sum(weight.shape))
        assert weight.abs().max() <= limit and weight.abs().max() > 0.99 * limit
        assert abs(weight.std().item() - limit / math.sqrt(3)) < 0.02 * limit
        assert torch.all(bias == 0)
    assert not torch.equal(book.build_network(784, seed=4)[0][0].weight, our_params[0])


def test_optimizers_are_rmsprop_as_keras_configures_it():
    model = book.build_network(64)[0]
    for native, expected in ((False, torchblocks.optim.RMSprop), (True, torch.optim.RMSprop)):
        optimizer = book.build_optimizer(model, native)
        assert type(optimizer) is expected
        group = optimizer.param_groups[0]
        settings = (group["lr"], group["alpha"], group["eps"], group["momentum"], group["centered"])
        assert settings == (1e-3, 0.9, 1e-7, 0, False)


def test_torchblocks_and_native_see_the_same_batches_and_stay_together(target):
    """Two epochs of the limited embedded set: same initial weights, same
    batch order; the trajectories differ only by float32 rounding."""
    if target.device == "cuda":
        pytest.skip("covered by the CUDA end-to-end run")
    data = embedded_digits()
    limit = 256 if target.interpreted else 1437
    data = type(data)(**{**data.__dict__, "train_images": data.train_images[:limit],
                          "train_labels": data.train_labels[:limit]})
    runs, models = [], []
    for native in (False, True):
        model, loss_fn = book.build_network(64, native, seed=1)
        runs.append(book.train("run", model, loss_fn, book.build_optimizer(model, native), data, epochs=2, seed=5))
        models.append(model)
    for ours, theirs in zip(runs[0].epochs, runs[1].epochs):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
        assert ours.test_accuracy == pytest.approx(theirs.test_accuracy, abs=2 / len(data.test_labels))
    for mine, theirs in zip(models[0].parameters(), models[1].parameters()):
        assert relative_error(mine, theirs) < 1e-4, "parameters after two epochs"


def test_networks_trained_together_take_turns_step_by_step_and_time_their_own_steps(monkeypatch):
    """A step of each network per batch, in turn (reversed every other batch),
    so that a slow spell of the machine falls on both; each epoch time counts
    the network's own steps only (here a clock that ticks once per reading:
    one second per step)."""
    data = embedded_digits()
    data = type(data)(**{**data.__dict__, "train_images": data.train_images[:300],
                         "train_labels": data.train_labels[:300]})
    order, networks = [], []
    for native in (False, True):
        model, loss_fn = book.build_network(64, native, seed=1)
        name = "native torch" if native else "torchblocks"
        model.register_forward_pre_hook(lambda module, args, name=name: order.append(name) if module.training else None)
        networks.append((name, model, loss_fn, book.build_optimizer(model, native)))
    ticks = iter(range(10**6))
    monkeypatch.setattr(book, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    runs = book.train_together(networks, data, epochs=2, batch_size=128, seed=3, stream=io.StringIO())
    steps = math.ceil(300 / 128)
    names = ["torchblocks", "native torch"]
    assert order == [name for step in range(steps) for name in (names if step % 2 == 0 else names[::-1])] * 2
    assert [[epoch.seconds for epoch in run.epochs] for run in runs] == [[steps, steps], [steps, steps]]


def test_train_together_needs_a_network():
    with pytest.raises(ValueError, match="networks is empty; expected at least one"):
        book.train_together([], embedded_digits())


def run_mnist(capsys, *argv):
    status = cli.main(["mnist", *argv])
    return status, capsys.readouterr().out


def test_mnist_command_end_to_end_on_the_embedded_digits(capsys, offline, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "mnist.png"
    status, out = run_mnist(capsys, "--limit", "1000", "--epochs", "3", "--seed", "7", "--plot", str(plot))
    assert status == 0
    assert "note: MNIST is not in" in out and "using the embedded scikit-learn 8x8 digits instead" in out
    assert "data: scikit-learn 8x8 digits: 1,437 training and 360 test images of 8x8 pixels" in out
    assert "(the first 1,000 training images used)" in out and "3 epochs of batch 128, seed 7, on cpu" in out
    assert re.findall(r"^epoch (\d)/3 \[=+\] 8/8\n  (torchblocks) +loss \S+ accuracy \S+ test accuracy \S+ \S+s\n"
                      r"  (native torch) +loss ", out, re.M) == [(str(e), "torchblocks", "native torch") for e in (1, 2, 3)]
    rows = {m[0]: float(m[1]) for m in re.findall(r"^(torchblocks|native torch)\s+scikit-learn 8x8 digits"
                                                   r"\s+\S+\s+\S+\s+\S+\s+(\S+)", out, re.M)}
    assert set(rows) == {"torchblocks", "native torch"}
    assert rows["torchblocks"] > 0.5, "well above chance (0.1)"
    assert abs(rows["torchblocks"] - rows["native torch"]) <= 0.03
    assert "the book" not in out, "the book's MNIST figure is shown only next to MNIST"
    assert re.search(r"torchblocks minus native: [+-]\d\.\d{4}", out)
    width, height = read_png(plot)
    assert width > 500 and height > 200


def test_mnist_command_without_compare_trains_torchblocks_only(capsys, offline):
    status, out = run_mnist(capsys, "--limit", "256", "--epochs", "1", "--no-compare")
    assert status == 0 and re.search(r"^epoch 1/1 \[=+\] 2/2\n  torchblocks  loss ", out, re.M)
    assert "native torch" not in out
    assert "1 epoch of batch 128" in out


@NO_CUDA
def test_mnist_command_on_cuda(capsys, offline):
    status, out = run_mnist(capsys, "--device", "cuda", "--epochs", "2")
    assert status == 0 and "on cuda" in out


def test_mnist_command_refuses_bad_options(capsys, offline, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["mnist", "--epochs", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["mnist", "--device", "cuda", "--data-dir", offline]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "matplotlib" else True)
    with pytest.raises(RuntimeError, match="--plot needs matplotlib.*pip install 'torchblocks\\[plot\\]'"):
        cli.main(["mnist", "--data-dir", offline, "--plot", "x.png"])


@pytest.mark.parametrize("download", [[], ["--no-download"]], ids=["download", "no-download"])
def test_a_named_data_dir_without_mnist_is_an_error_not_a_fallback(capsys, offline, download):
    status = cli.main(["mnist", "--data-dir", offline, *download])
    err = capsys.readouterr().err
    assert status == 1 and f"torchblocks mnist: MNIST is not in {offline}" in err
    assert "Traceback" not in err and not os.path.exists(offline)


def test_data_errors_print_the_message_alone_and_the_traceback_on_request(capsys, offline, monkeypatch):
    os.makedirs(offline)
    with open(os.path.join(offline, "train-images-idx3-ubyte.gz"), "wb") as f:
        f.write(b"\x1f\x8b\x08\x00" + bytes(6) + b"truncated")
    assert cli.main(["mnist", "--data-dir", offline]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert cli.main(["--debug", "mnist", "--data-dir", offline]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TORCHBLOCKS_DEBUG", "1")
    assert cli.main(["mnist", "--data-dir", offline]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_report_shows_the_book_next_to_mnist():
    digits = embedded_digits()
    mnist_like = type(digits)(**{**digits.__dict__, "name": "MNIST"})
    run = book.Run("torchblocks", [book.Epoch(0.1, 0.97, 0.2, 0.9777, 2.0), book.Epoch(0.1, 0.98, 0.2, 0.9780, 1.0),
                                   book.Epoch(0.1, 0.98, 0.2, 0.9781, 1.5)])
    report = book.format_report([run], mnist_like)
    assert re.search(r"torchblocks\s+MNIST\s+0.1000\s+0.9800\s+0.2000\s+0.9781\s+1.5", report)
    assert re.search(r"the book \(Keras 2, 5 epochs\)\s+MNIST(\s+-){3}\s+0.9785", report)


def load_example():
    spec = importlib.util.spec_from_file_location("from_scratch", os.path.join(ROOT, "examples", "from_scratch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_from_scratch_example_runs_and_learns(capsys, offline):
    example = load_example()
    example.main(["--limit", "512", "--epochs", "3"])
    out = capsys.readouterr().out
    losses = [float(loss) for loss in re.findall(r"epoch \d/3: mean loss (\S+)", out)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert re.search(r"test accuracy: \d\.\d{4} \(scikit-learn 8x8 digits\)", out)
    # The book's learning rate barely moves on 1,437 images; a larger one shows the loop learns.
    accuracy = example.main(["--learning-rate", "0.1"])
    assert accuracy > 0.5


def test_plot_keeps_identical_runs_visible_and_ticks_whole_epochs(tmp_path, monkeypatch):
    """torchblocks and native often agree to the last digit: native's curve is
    drawn under torchblocks' with other line and marker styles; a one-epoch
    run ticks epoch 1 only."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    epoch = book.Epoch(train_loss=0.5, train_accuracy=0.8, test_loss=0.6, test_accuracy=0.75, seconds=1.0)
    runs = [book.Run("torchblocks", [epoch]), book.Run("native torch", [epoch])]
    panels = book.plot_panels(runs)
    for lines in panels.values():
        ours, theirs = lines["torchblocks test"], lines["native torch test"]
        assert ours[:2] == theirs[:2]
        assert ours[3]["linestyle"] != theirs[3]["linestyle"] and ours[3]["markersize"] < theirs[3]["markersize"]
        assert ours[3]["zorder"] > theirs[3]["zorder"] and theirs[3]["markerfacecolor"] == "none"
    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)
    book.plot(runs, embedded_digits(), str(tmp_path / "one-epoch.png"))
    assert [list(axis.get_xticks()) for axis in figures[0].axes] == [[1], [1]]
