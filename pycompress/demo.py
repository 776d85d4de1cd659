"""``pycompress demo``: compress a classifier of scikit-learn's digits images.

Trains a float MLP on the 8x8 digits (real data shipped with scikit-learn),
converts its Linear layers to the int8 kernel, and prints accuracy, bytes and
latency of each stage beside the float model. Deterministic for a seed.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import pycompress as pc


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def latency_us(model: nn.Module, x: torch.Tensor, repeats: int = 200) -> float:
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def to_int8(model: nn.Module) -> nn.Module:
    layers = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            layers.append(pc.nn.Int8Linear.from_float(layer))
        else:
            layers.append(layer)
    return nn.Sequential(*layers)


def run_demo(quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs = 3 if quick else 30
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(x_train), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            print(f"  training float model: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}", flush=True)
    model.eval()
    converted = to_int8(model)
    rows = []
    for name, m in (("float (PyTorch)", model), ("int8 (pycompress)", converted)):
        rows.append((name, accuracy(m, x_test, y_test), model_bytes(m), latency_us(m, x_test[:1]),
                     latency_us(m, x_test[:64])))
    print(f"\n{'stage':<20} {'accuracy':>9} {'bytes':>10} {'batch1 us':>10} {'batch64 us':>11}")
    for name, acc, size, lat1, lat64 in rows:
        print(f"{name:<20} {acc:>9.4f} {size:>10d} {lat1:>10.1f} {lat64:>11.1f}")
    return {"rows": rows}
