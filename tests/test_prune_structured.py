"""Structured channel pruning that physically shrinks Conv/BN/Linear chains and residual blocks."""

import pytest
import torch
from torch import nn

import pycompress as pc


def n_params(model):
    return sum(p.numel() for p in model.parameters())


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def zero_channels(conv_or_linear, bn, channels):
    """Make output channels exactly zero after BN: zero filter and bias, BN maps 0 -> 0."""
    with torch.no_grad():
        conv_or_linear.weight[channels] = 0
        if conv_or_linear.bias is not None:
            conv_or_linear.bias[channels] = 0
        if bn is not None:
            bn.running_mean[channels] = 0
            bn.bias[channels] = 0


def randomize_bn(model):
    torch.manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)


def test_removing_zero_channels_preserves_the_function_and_shrinks_the_model():
    torch.manual_seed(0)
    model = ConvNet().eval()
    randomize_bn(model)
    zero_channels(model.conv1, model.bn1, [1, 4, 5, 9, 12, 15, 0, 7])  # 8 of 16
    zero_channels(model.conv2, model.bn2, list(range(0, 32, 2)))  # 16 of 32
    zero_channels(model.fc1, None, list(range(12)))  # 12 of 24
    x = torch.randn(6, 3, 8, 8)
    ref = model(x)
    before = n_params(model)
    pc.prune(model, 0.5, method="channel", example_inputs=x)
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (8, 8, 8)
    assert (model.conv2.out_channels, model.bn2.num_features) == (16, 16)
    assert model.fc1.in_features == 16 * 16 and model.fc1.out_features == 12 and model.fc2.in_features == 12
    assert model.fc2.out_features == 5  # model output left alone
    assert model.bn1.running_mean.shape == (8,) and model.conv1.weight.shape == (8, 3, 3, 3)
    assert n_params(model) < 0.5 * before
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    # the shrunk model still trains
    model.train()
    model(x).sum().backward()


def test_mlp_neuron_pruning_preserves_function_when_neurons_are_dead():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 40), nn.GELU(), nn.Linear(40, 30), nn.ReLU(), nn.Dropout(0.1), nn.Linear(30, 3))
    model.eval()
    dead = torch.randperm(40)[:30]
    with torch.no_grad():
        model[0].weight[dead] = 0
        model[0].bias[dead] = 0
        model[2].weight[::3] = 0
        model[2].bias[::3] = 0
    x = torch.randn(7, 10)
    ref = model(x)
    pc.prune(model, 0.75, method="channel", overrides={"2": 1 / 3})
    assert [model[0].out_features, model[2].in_features, model[2].out_features, model[5].in_features] == [10, 10, 20, 20]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.b_bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.b_bn(self.b(torch.relu(self.a_bn(self.a(h)))))
        return self.head(torch.relu(h + y)).mean(dim=(2, 3))


def test_residual_channels_are_pruned_together():
    torch.manual_seed(2)
    model = Residual().eval()
    randomize_bn(model)
    tied = [0, 3, 5, 6, 10, 11, 13, 14]
    zero_channels(model.stem, None, tied)
    zero_channels(model.b, model.b_bn, tied)
    zero_channels(model.a, model.a_bn, [1, 2, 6, 7])
    x = torch.randn(2, 3, 6, 6)
    ref = model(x)
    pc.prune(model, 0.5, method="channel")
    assert model.stem.out_channels == model.b.out_channels == model.b_bn.num_features == model.head.in_channels == 8
    assert model.a.in_channels == 8 and model.a.out_channels == 4 and model.b.in_channels == 4
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_excluding_one_tied_layer_leaves_the_whole_group_dense():
    model = Residual().eval()
    pc.prune(model, 0.5, method="channel", exclude=["b"])
    assert model.stem.out_channels == model.b.out_channels == 16
    assert model.a.out_channels == 4  # the untied inner channels are still pruned
    model(torch.randn(1, 3, 6, 6))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 8, 3, padding=1)
        self.right = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        h = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(torch.relu(self.inner(h)))


def test_unsupported_graph_is_a_clear_error_and_leaves_the_model_untouched():
    model = Concat()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot prune the output channels of left: they flow into "
                                         r"call_function cat .*Exclude the layer \(exclude=\['left'\]\).*not modified"):
        pc.prune(model, 0.5, method="channel")
    assert model.inner.out_channels == 16  # the prunable group was planned but not applied
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # excluding the layers feeding the cat makes the rest prunable
    pc.prune(model, 0.5, method="channel", exclude=["left", "right"])
    assert model.inner.out_channels == 8 and model.head.in_channels == 8
    model(torch.randn(1, 3, 4, 4))


def test_flatten_without_example_inputs_and_untraceable_models():
    with pytest.raises(ValueError, match=r"cannot prune the output channels of conv2.*flatten needs the spatial size: "
                                         r"pass example_inputs"):
        pc.prune(ConvNet(), 0.5, method="channel")

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match=r"cannot be traced by torch.fx"):
        pc.prune(DataDependent(), 0.5, method="channel")
    grouped = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match=r"output channels of 0: .*grouped conv \(groups=2\)"):
        pc.prune(grouped, 0.5, method="channel")


def test_channel_pruning_rejects_masked_layers_and_global_scope():
    model = pc.prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)
    with pytest.raises(ValueError, match=r"layer 0 has parametrizations on weight"):
        pc.prune(model, 0.5, method="channel")
    with pytest.raises(ValueError, match=r"method='channel' supports scope='layer' only"):
        pc.prune(nn.Linear(2, 2), 0.5, method="channel", scope="global")
