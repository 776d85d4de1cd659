"""Decoder LLMs (issue 14 item 4): Hugging Face GPT-2 (transformers Conv1D layers), Llama, Qwen2 and Mistral,
quantized to 4-bit weights (GPTQ, groups of 32), convert to the int4 kernels in every Linear, and greedy
``generate`` with the KV cache gives the tokens of the simulated (fake-quant) model. The simulation and the
kernels round differently (float sums of dequantized values against exact integer sums), so the two may part
only where the simulated model's two best logits are a near-tie; the test reports each such step with both
logits and fails on any other difference. Random weights (no trained decoder installs here): shapes, formats
and generation, not accuracy."""

from __future__ import annotations

import copy

import pytest
import torch

import pycompress as pc
from pycompress.nn import Int4Linear

transformers = pytest.importorskip("transformers")

VOCAB = 256
PROMPTS = ([5, 17, 99, 3], [200, 1, 45, 45, 7, 130, 64, 2, 11])
NEW_TOKENS = 12
# Parting at a step is a near-tie when the simulated model's logits of the two tokens differ by less than
# this fraction of its largest |logit| there (the two roundings differ by ~1e-6 of it).
NEAR_TIE = 1e-3


def _config(arch: str):
    if arch == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig}[arch](**common)


def _models(arch: str):
    torch.manual_seed(0)
    config = _config(arch)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, VOCAB, (4, 16), generator=gen) for _ in range(4)]
    simulated = copy.deepcopy(model)
    pc.quantize(simulated, batches, weight_bits=4, group_size=32, method="gptq", progress=False)
    converted = pc.convert(copy.deepcopy(simulated), policy="state")
    return simulated, converted


def _greedy(model, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0, len(prompt):].tolist()


@pytest.mark.once_per_ci
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mistral"])
def test_decoder_converts_to_int4_and_generates_the_simulated_tokens(arch):
    simulated, converted = _models(arch)
    linears = [n for n, m in simulated.named_modules() if isinstance(m, torch.nn.Linear)]
    int4 = {n for n, m in converted.named_modules() if isinstance(m, Int4Linear)}
    assert set(linears) == int4 and len(int4) >= 9  # every Linear (GPT-2's Conv1D included) runs the int4 kernel
    assert all(m.group_size == 32 and m.weight_bits == 4 for _, m in converted.named_modules()
               if isinstance(m, Int4Linear))
    partings = []
    for prompt in PROMPTS:
        want, got = _greedy(simulated, prompt), _greedy(converted, prompt)
        if want == got:
            continue
        step = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        with torch.no_grad():
            logits = simulated(torch.tensor([prompt + want[:step]])).logits[0, -1]
        gap = (logits[want[step]] - logits[got[step]]).abs().item()
        partings.append(f"prompt {prompt} step {step}: simulated picks {want[step]} (logit "
                        f"{logits[want[step]].item():.6f}), kernels {got[step]} (logit {logits[got[step]].item():.6f})")
        assert gap <= NEAR_TIE * logits.abs().max().item(), "not a near-tie: " + partings[-1]
    if partings:
        print("near-ties where the tokens parted:\n" + "\n".join(partings))


@pytest.mark.once_per_ci
def test_converted_decoder_saves_and_loads(tmp_path):
    _, converted = _models("gpt2")
    path = tmp_path / "gpt2.safetensors"
    pc.save(converted, path)
    skeleton = transformers.AutoModelForCausalLM.from_config(_config("gpt2")).eval()
    restored = pc.load(path, model=skeleton)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, converted(ids).logits)
