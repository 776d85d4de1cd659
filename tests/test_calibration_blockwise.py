"""Block-by-block calibration (pycompress.calibration.sequential_walk): the same integers, masks and weights
as the whole-model passes, with each block's inputs computed once (exact pass counts), a fallback where the
blocks cannot be replayed, and the peak memory: one block's inputs for all batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from torch import nn

import pycompress as pc
import pycompress.calibration as cal
from pycompress.quant import quantized_weight
from test_calibration_distributed import Net, batches

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.once_per_ci  # nothing here depends on the ISA path


def _tiny_hf(arch):
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    else:
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                          max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randint(1, 256, (4, 24), generator=gen) for _ in range(3)]


def _mlp():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    return (nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16)),
            [torch.randn(96, 32, generator=g) for _ in range(3)])


CASES = {
    # name: (model and batches, group size, whole-model passes per batch: block by block, whole-model walk)
    "modulelist": (lambda: (Net(), batches()), 16, 4, 12),  # trace, inp, block 0's inputs, head | 1 + 11 groups
    "sequential": (_mlp, 16, 2, 4),  # trace, block 0's inputs | 1 + 3 groups
    "llama": (lambda: _tiny_hf("llama"), 32, 3, 10),  # trace, block 0's inputs, lm_head | 1 + 4 * 2 + 1
    "gpt2": (lambda: _tiny_hf("gpt2"), 32, 3, 10),  # c_attn, c_proj, c_fc, mlp.c_proj per block
}


def _quantize(case, blockwise, monkeypatch):
    make, group, _, _ = CASES[case]
    model, data = make()
    monkeypatch.setattr(cal, "BLOCKWISE", blockwise)
    passes = []
    hook = model.register_forward_pre_hook(lambda *a: passes.append(1))
    pc.quantize(model, data, weight_bits=4, group_size=group, method="gptq", progress=False)
    hook.remove()
    ints = {n: quantized_weight(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return ints, len(passes) // len(data)


@pytest.mark.parametrize("case", list(CASES))
def test_block_by_block_gives_the_whole_model_walks_integers_with_each_block_input_computed_once(case, monkeypatch):
    blockwise, passes_b = _quantize(case, True, monkeypatch)
    whole, passes_w = _quantize(case, False, monkeypatch)
    assert blockwise.keys() == whole.keys() and len(blockwise) >= 3
    for name in whole:
        assert torch.equal(blockwise[name][0], whole[name][0]), name
        assert torch.equal(blockwise[name][1], whole[name][1]), name
    assert (passes_b, passes_w) == CASES[case][2:]


def test_one_shot_pruning_block_by_block_equals_the_whole_model_walk(monkeypatch):
    out = {}
    for blockwise in (True, False):
        monkeypatch.setattr(cal, "BLOCKWISE", blockwise)
        for criterion in ("wanda", "sparsegpt"):
            model = Net()
            pc.prune(model, 0.5, criterion=criterion, calibration_batches=batches(), progress=False)
            out[blockwise, criterion] = [p.detach().clone() for p in model.parameters()]
    for criterion in ("wanda", "sparsegpt"):
        assert all(torch.equal(a, b) for a, b in zip(out[True, criterion], out[False, criterion]))


class Between(nn.Module):
    """A layer outside the blocks runs between them: the blocks cannot be replayed one after another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(2))
        self.mid = nn.Linear(32, 32)

    def forward(self, x):
        return self.blocks[1](self.mid(self.blocks[0](x)))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        y = self.fc(x)
        return x.add_(y)  # changes its input: a replay would see another input


@pytest.mark.parametrize("make", [Between, lambda: (torch.manual_seed(6), nn.Sequential(InPlace(), InPlace()))[1]],
                         ids=["layer_between_blocks", "block_changes_its_input"])
def test_models_whose_blocks_cannot_be_replayed_fall_back_to_whole_model_passes(make, monkeypatch):
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(64, 32, generator=g) for _ in range(2)]
    results = []
    for blockwise in (True, False):
        monkeypatch.setattr(cal, "BLOCKWISE", blockwise)
        model = make()
        passes = []
        model.register_forward_pre_hook(lambda *a: passes.append(1))
        pc.quantize(model, [d.clone() for d in data], weight_bits=4, group_size=16, method="gptq", progress=False)
        results.append(([quantized_weight(m)[0] for m in model.modules() if isinstance(m, nn.Linear)], len(passes)))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    groups = len(results[0][0])
    assert results[0][1] == results[1][1] == len(data) * (1 + groups)  # the same whole-model passes


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, torch
    from torch import nn
    import pycompress as pc, pycompress.calibration as cal
    torch.set_num_threads(1)
    D, ROWS, NB, NBLK = 256, 1024, 32, 2
    def make():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)) for _ in range(NBLK)])
    def rss(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(ROWS, D, generator=g) for _ in range(NB)]
    pc.prune(make(), 0.5, criterion="wanda", calibration_batches=data[:2], progress=False)  # warm-up
    out = {}
    for mode in ("whole", "block"):
        cal.BLOCKWISE = mode == "block"
        model = make()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current RSS
        base = rss("VmRSS")
        pc.prune(model, 0.5, criterion="wanda", calibration_batches=data, progress=False)
        out[mode] = rss("VmHWM") - base
    out["batch"] = ROWS * D * 4
    out["block_inputs"] = NB * ROWS * D * 4
    out["all_layer_inputs"] = 2 * NBLK * NB * ROWS * D * 4
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset: Linux (and glibc's "
                    "MALLOC_MMAP_THRESHOLD_)")
def test_block_by_block_peak_memory_is_one_blocks_inputs():
    """Wanda on 2 blocks x 2 Linear(256, 256), 32 batches of 1024 rows (1 MiB each). Measured in a fresh
    process after a warm-up, big allocations mmapped (so frees return to the OS): the peak RSS (VmHWM, reset
    before each run) above the RSS before the run. The whole-model walk's peak is one batch's working set
    inside a block (measured 7.8 MiB: the activations and their float64 rows), the block-by-block walk's
    that plus block 0's outputs for all 32 batches, 32 MiB (measured 38.9 MiB); keeping every layer's
    inputs would be 128 MiB. Expectation: block-wise = whole-model walk + the 32 MiB of one block's inputs,
    within 3 batches (3 MiB); the whole-model walk's working set under 10 batches (10 MiB)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    # Outside the source tree, so the installed package is imported and not ./pycompress (no _C there).
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < m["whole"] <= 10 * m["batch"], m
    assert abs(m["block"] - m["whole"] - m["block_inputs"]) <= 3 * m["batch"], m
    assert m["block"] < m["all_layer_inputs"] / 3, m
