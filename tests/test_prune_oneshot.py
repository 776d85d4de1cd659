"""One-shot pruning criteria (pc.prune(criterion="wanda" | "sparsegpt")): exact masks on constructed
examples, exact sparsity, reconstruction error against magnitude pruning, composition with GPTQ,
convert, bad input."""

import copy

import pytest
import torch
from torch import nn

import pycompress as pc
import pycompress.prune.oneshot as oneshot
from pycompress.prune.oneshot import sparsegpt_prune
from pycompress.quant import quantized_weight


def correlated_inputs(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(rows, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def linear_with(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def single_linear(k=64, n=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, n))


def test_wanda_keeps_small_weights_on_a_loud_input_column():
    w = torch.tensor([[0.1, 1.0, 2.0, 3.0],
                      [3.0, 0.2, 1.0, 2.0]])
    x = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0]))  # ||x_0|| = 100, the others 1
    model = pc.prune(linear_with(w), 0.5, criterion="wanda", calibration_batches=[x])
    # scores row 0: [10, 1, 2, 3] -> drop k 1, 2; row 1: [300, 0.2, 1, 2] -> drop k 1, 2
    expected = torch.tensor([[True, False, False, True], [True, False, False, True]])
    assert torch.equal(pc.prune.get_mask(model[0]), expected)
    assert torch.equal(model[0].weight.detach(), w * expected)  # Wanda does not update weights
    magnitude = pc.prune(linear_with(w), 0.5)
    assert torch.equal(pc.prune.get_mask(magnitude[0]), torch.tensor([[False, False, True, True],
                                                                      [True, False, False, True]]))


def test_wanda_compares_within_each_output_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [10.0, 20.0, 30.0, 40.0]])
    model = pc.prune(linear_with(w), 0.5, criterion="wanda", calibration_batches=[torch.eye(4)])
    # per layer the second row would keep everything; per row each keeps its two largest
    assert torch.equal(pc.prune.get_mask(model[0]), torch.tensor([[False, False, True, True]] * 2))


def test_wanda_nm_and_blocks_on_constructed_scores():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0])
    x = torch.diag(norms)
    nm = pc.prune(linear_with(w), method="nm", criterion="wanda", calibration_batches=[x])
    # scores [10, 2, 3, 4 | 4, 3, 2, 10]: keep the 2 largest of each 4
    assert torch.equal(pc.prune.get_mask(nm[0]), torch.tensor([[True, False, False, True, True, False, False, True]]))
    w2 = torch.tensor([[1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [4.0] * 4])
    norms2 = torch.tensor([10.0] * 4 + [1.0] * 12)
    blocks = pc.prune(linear_with(w2), 0.5, method="block", criterion="wanda",
                      calibration_batches=[torch.diag(norms2)])
    # 1x4 block sums: [40, 8, 12, 16]: drop the 2nd and 3rd blocks (magnitude would drop the 1st and 2nd)
    assert torch.equal(pc.prune.get_mask(blocks[0]), torch.tensor([[True] * 4 + [False] * 8 + [True] * 4]))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("method,sparsity", [("magnitude", 0.5), ("magnitude", 0.3), ("block", 0.5), ("nm", None)])
def test_sparsity_is_exactly_as_asked(criterion, method, sparsity):
    x = correlated_inputs(256, 64, seed=1)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    kwargs = {} if sparsity is None else {"sparsity": sparsity}
    pc.prune(model, method=method, criterion=criterion, calibration_batches=[x], **kwargs)
    for layer in (model[0], model[2]):
        mask = pc.prune.get_mask(layer)
        pruned = int((~mask).sum())
        assert pruned == round((0.5 if sparsity is None else sparsity) * mask.numel())
        assert (layer.weight[~mask] == 0).all()
        if method == "nm":
            assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
        if method == "block":
            blocks = mask.reshape(mask.shape[0], -1, 4)
            assert (blocks.all(-1) | ~blocks.any(-1)).all()  # whole 1x4 blocks


@pytest.mark.parametrize("method", ["magnitude", "nm", "block"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(method):
    x = correlated_inputs(512, 64, seed=2)
    w = single_linear(seed=2)[0].weight.detach().clone()
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = single_linear(seed=2)
        pc.prune(model, **({} if method == "nm" else {"sparsity": 0.5}), method=method, criterion=criterion,
                 calibration_batches=None if criterion == "magnitude" else [x])
        errors[criterion] = float((x @ w.t() - x @ model[0].weight.detach().t()).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_with_a_diagonal_hessian_is_magnitude_pruning_without_updates():
    x = hadamard(64)  # X^T X = 64 I: no error to spread, the saliency is w^2 / const
    model = single_linear(seed=3)
    w = model[0].weight.detach().clone()
    pc.prune(model, 0.5, criterion="sparsegpt", calibration_batches=[x])
    magnitude = pc.prune(single_linear(seed=3), 0.5)
    mask = pc.prune.get_mask(model[0])
    assert torch.equal(mask, pc.prune.get_mask(magnitude[0]))  # one 64-column block: one global threshold
    assert torch.equal(model[0].weight.detach(), w * mask)


def test_sparsegpt_updates_the_kept_weights():
    x = correlated_inputs(256, 64, seed=4)
    model = single_linear(seed=4)
    w = model[0].weight.detach().clone()
    new_w, keep = sparsegpt_prune(w, 2 * x.double().t() @ x.double() / 256, 0.5)
    assert torch.equal(new_w[~keep], torch.zeros(int((~keep).sum())))
    assert not torch.equal(new_w[keep], w[keep])


def test_layers_are_pruned_sequentially(monkeypatch):
    x = correlated_inputs(256, 32, seed=5)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    with torch.no_grad():
        float_hidden = torch.relu(model[0](x))
    seen = []
    real = oneshot.wanda_mask
    monkeypatch.setattr(oneshot, "wanda_mask", lambda w, norms, *a: (seen.append(norms.clone()), real(w, norms, *a))[1])
    pc.prune(model, 0.5, criterion="wanda", calibration_batches=[x[:128], x[128:]])
    with torch.no_grad():
        hidden = torch.relu(model[0](x)).double()
    torch.testing.assert_close(seen[1], hidden.norm(dim=0))
    assert not torch.allclose(seen[1], float_hidden.double().norm(dim=0))


def test_tuple_and_dict_batches():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(6)
            self.fc = nn.Linear(32, 16)

        def forward(self, x, shift=0.0):
            return self.fc(x + shift)

    x = correlated_inputs(64, 32, seed=6)
    masks = []
    for batches in ([(x,)], [{"x": x}], [{"x": x, "shift": torch.linspace(-5, 5, 32)}]):
        model = pc.prune(Keyword(), 0.5, criterion="wanda", calibration_batches=batches)
        masks.append(pc.prune.get_mask(model.fc))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_prune_then_gptq_keeps_the_sparsity_and_converts():
    x = correlated_inputs(256, 64, seed=7)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    pc.prune(model, 0.5, criterion="sparsegpt", calibration_batches=[x])
    masks = [pc.prune.get_mask(model[i]) for i in (0, 2)]
    pc.quantize(model, [x], weight_bits=8, method="gptq")
    for i, mask in zip((0, 2), masks):
        assert (quantized_weight(model[i])[0][~mask] == 0).all()
    reference = copy.deepcopy(model)
    converted = pc.convert(model, policy="int8", overrides={"0": "sparse-int8"})
    formats = [r.format for r in pc.summary(converted).rows]
    assert formats == ["sparse-int8", "int8-dynamic"]
    assert pc.verify(converted, reference, x[:32]).ok


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_one_shot_pruned_float_model_converts_to_sparse_fp32(criterion):
    x = correlated_inputs(256, 64, seed=8)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    pc.prune(model, 0.75, criterion=criterion, calibration_batches=[x])
    with torch.no_grad():
        expected = model(x[:16])
    converted = pc.convert(model, policy="sparse-fp32")
    assert [r.format for r in pc.summary(converted).rows] == ["sparse-fp32", "sparse-fp32"]
    torch.testing.assert_close(converted(x[:16]), expected, rtol=1e-5, atol=1e-5)


def test_conv_layers():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    x = torch.randn(8, 4, 6, 6)
    ref = copy.deepcopy(model)
    for criterion in ("wanda", "sparsegpt"):
        m = pc.prune(copy.deepcopy(ref), 0.5, criterion=criterion, calibration_batches=[x])
        assert pc.prune.sparsity_report(m)["__total__"] == 0.5
    with pytest.raises(ValueError, match=r"prune\(0\).*groups=4"):
        pc.prune(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), 0.5, criterion="wanda",
                 calibration_batches=[torch.randn(2, 4, 6, 6)])


def test_one_shot_pruning_bad_input():
    x = correlated_inputs(256, 64, seed=10)
    with pytest.raises(ValueError, match="criterion='wanda' needs calibration_batches"):
        pc.prune(single_linear(), 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="unknown criterion 'snip'"):
        pc.prune(single_linear(), 0.5, criterion="snip", calibration_batches=[x])
    with pytest.raises(ValueError, match="not 'channel'"):
        pc.prune(single_linear(), 0.5, method="channel", criterion="sparsegpt", calibration_batches=[x])
    with pytest.raises(ValueError, match="scope='global' is not supported"):
        pc.prune(single_linear(), 0.5, scope="global", criterion="wanda", calibration_batches=[x])
    with pytest.raises(TypeError, match="not one tensor"):
        pc.prune(single_linear(), 0.5, criterion="wanda", calibration_batches=x)
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        pc.prune(single_linear(), 0.5, criterion="wanda", calibration_batches=[])
    with pytest.raises(ValueError, match=r"prune\(0\).*K=6"):
        pc.prune(nn.Sequential(nn.Linear(6, 4)), method="nm", criterion="sparsegpt",
                 calibration_batches=[torch.randn(16, 6)])


def test_sparsegpt_rank_deficit_names_the_layer_and_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"prune\(2\).*40 input rows for 64 live input features.*rank deficit"):
        pc.prune(model, 0.5, criterion="sparsegpt", calibration_batches=[torch.randn(40, 16)])
    assert pc.prune.get_mask(model[0]) is None and pc.prune.get_mask(model[2]) is None
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
