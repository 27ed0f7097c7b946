"""torchblocks.patch beyond nn.Sequential: fusion read from a torch.fx trace,
Linear subclasses, and the report of what was replaced and what was not."""

import torch
import torch.nn.functional as F
from torch import nn

import torchblocks
from torchblocks.testing import assert_close


class Mlp(nn.Module):
    """timm's Mlp block: fc1, act, drop, fc2 as attributes."""

    def __init__(self, act_layer=nn.ReLU):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.act = act_layer()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class SharedReLU(Mlp):
    """One ReLU module called twice: it cannot become an Identity."""

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


class Residual(Mlp):
    """fc1's output goes to the ReLU and to the sum: it is needed before the ReLU."""

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc2(self.act(hidden) + hidden)


class Untraceable(Mlp):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def patched_twin(make):
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    return model, make()


def assert_same_training(model, native, x):
    for net in (model, native):
        output = net(x)
        (output * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
    assert_close(model(x), native(x))
    for (name, ours), theirs in zip(model.named_parameters(), native.parameters()):
        assert_close(ours.grad, theirs.grad, what=f"gradient of {name}")


def test_a_timm_style_mlp_fuses(capsys):
    model, native = patched_twin(lambda: Block(Mlp()))
    parameters = list(model.parameters())
    torchblocks.patch(model, verbose=True)
    assert isinstance(model.mlp.fc1, torchblocks.nn.Dense) and model.mlp.fc1.activation == "relu"
    assert isinstance(model.mlp.act, nn.Identity)
    assert isinstance(model.mlp.fc2, torchblocks.nn.Dense) and model.mlp.fc2.activation is None
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert_same_training(model, native, torch.randn(4, 8))
    report = capsys.readouterr().out
    assert "mlp.fc1  Linear  Dense(relu)  its only consumer is act" in report, report
    assert "mlp.act  ReLU    Identity     fused into fc1" in report, report


def test_no_fusion_when_the_relu_or_the_linear_output_has_another_use():
    for make in (SharedReLU, Residual):
        model, native = patched_twin(make)
        torchblocks.patch(model)
        assert model.fc1.activation is None and isinstance(model.act, torchblocks.nn.ReLU), make.__name__
        assert_same_training(model, native, torch.randn(4, 8))


def test_an_untraceable_forward_is_reported_and_still_patched(capsys):
    model, native = patched_twin(Untraceable)
    torchblocks.patch(model, verbose=True)
    assert isinstance(model.fc1, torchblocks.nn.Dense) and model.fc1.activation is None
    assert isinstance(model.act, torchblocks.nn.ReLU)
    assert_same_training(model, native, torch.randn(4, 8))
    assert "(model)  Untraceable  not fused  its forward cannot be traced by torch.fx" in capsys.readouterr().out


def test_linear_subclasses():
    """MultiheadAttention's out_proj (a Linear subclass with Linear's forward)
    becomes a Dense; a subclass with its own forward or more state is left alone."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class WithBuffer(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.register_buffer("scale", torch.ones(1))

    torch.manual_seed(0)
    model = nn.ModuleDict({"attention": nn.MultiheadAttention(8, 2), "scaled": Scaled(8, 8),
                           "buffered": WithBuffer(8, 8)})
    out_proj = model["attention"].out_proj
    x = torch.randn(3, 2, 8)
    expected = model["attention"](x, x, x)[0]
    changes = []
    torchblocks.patching._patch(model, "", changes)
    assert isinstance(model["attention"].out_proj, torchblocks.nn.Dense)
    assert model["attention"].out_proj.weight is out_proj.weight
    assert_close(model["attention"](x, x, x)[0], expected)
    assert type(model["scaled"]) is Scaled and type(model["buffered"]) is WithBuffer
    left = {c.name: c.why for c in changes if c.result == "left alone"}
    assert left == {"scaled": "Scaled overrides forward", "buffered": "WithBuffer holds more than weight and bias"}


def test_a_functional_relu_is_not_fused():
    class FunctionalAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
            self.unused = nn.ReLU()

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    model, native = patched_twin(FunctionalAct)
    torchblocks.patch(model)
    assert model.fc1.activation is None
    assert_same_training(model, native, torch.randn(4, 8))
