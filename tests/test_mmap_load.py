"""pc.load(path, mmap=True): the same outputs bit for bit as a copying load, tensors that are views of the
file's copy-on-write mapping (so processes share its pages), the same checks before any kernel, and a file
that nothing changes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import pycompress as pc


def _file_mappings(path: str) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of this process's mappings of ``path`` (Linux /proc/self/maps)."""
    real = os.path.realpath(path)
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                spans.append((start, end, fields[1]))
    return spans


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Encoder(torch.nn.Module):
    """Not rebuildable from the manifest (load needs model=): a float embedding kept as it is beside the
    converted layers, so both kinds of tensor come from the file."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 256)
        self.fc1 = torch.nn.Linear(256, 1024)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(1024, 256)

    def forward(self, ids):
        return self.fc2(self.act(self.fc1(self.embed(ids))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    sequential = pc.convert(torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                                torch.nn.Linear(1024, 64)).eval(), policy="int8")
    encoder = pc.convert(Encoder().eval(), policy="int8")
    directory = tmp_path_factory.mktemp("mmap")
    pc.save(sequential, directory / "sequential.safetensors")
    pc.save(encoder, directory / "encoder.safetensors")
    return directory


def _load(directory, name: str, mmap: bool):
    path = str(directory / f"{name}.safetensors")
    skeleton = None if name == "sequential" else Encoder().eval()
    return path, pc.load(path, model=skeleton, mmap=mmap)


@pytest.mark.parametrize("name", ["sequential", "encoder"])
def test_mmap_load_gives_the_copied_loads_outputs_and_maps_every_tensor(saved, name):
    path, copied = _load(saved, name, mmap=False)
    digest = _sha256(path)
    _, mapped = _load(saved, name, mmap=True)
    spans = _file_mappings(path)
    assert spans and all(perms.endswith("p") for _, _, perms in spans), spans  # private: writes never reach the file
    inside = lambda t: any(start <= t.data_ptr() and t.data_ptr() + t.nbytes <= end  # noqa: E731
                           for start, end, _ in spans)
    assert all(inside(t) for t in _tensors(mapped).values()), [k for k, t in _tensors(mapped).items() if not inside(t)]
    assert not any(inside(t) for t in _tensors(copied).values())
    torch.manual_seed(1)
    x = torch.randint(0, 1000, (4, 7)) if name == "encoder" else torch.randn(5, 512)
    with torch.inference_mode():
        assert torch.equal(mapped(x), copied(x))
    # A write into a mapped tensor copies its page: the file keeps its bytes.
    with torch.no_grad():
        next(iter(_tensors(mapped).values())).fill_(0)
    assert _sha256(path) == digest


def test_mmap_load_runs_every_check_before_a_kernel(saved, tmp_path):
    """A flipped bit in a copy of the file is refused by the checksum, naming the tensor, with mmap too."""
    path = str(saved / "sequential.safetensors")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    header = int.from_bytes(data[:8], "little")
    entries = json.loads(data[8:8 + header])
    begin, _ = entries["0.w_packed"]["data_offsets"]
    data[8 + header + begin] ^= 0x01
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 0\.w_packed of layer 0 .* fails its sha256 checksum"):
        pc.load(corrupt, mmap=True)


# once_per_ci: a fresh interpreter, so that what the load adds to resident memory is all that is measured.
@pytest.mark.once_per_ci
def test_mmap_load_adds_far_less_private_memory_than_the_weights(tmp_path):
    torch.manual_seed(0)
    # 32 MiB of weights (float layers: convert keeps them as they are, so the file holds them whole).
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048)).eval()
    path = tmp_path / "float.safetensors"
    pc.save(model, path)
    weight_bytes = sum(t.nbytes for t in model.state_dict().values())
    script = textwrap.dedent(f"""
        import sys, torch, pycompress as pc

        def private_kib():  # anonymous and private-dirty pages: what another process could not share
            with open("/proc/self/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return int(fields["Private_Dirty"].split()[0])

        before = private_kib()
        model = pc.load({str(path)!r}, mmap=sys.argv[1] == "mmap")
        with torch.inference_mode():
            model(torch.randn(2, 2048))
        print(private_kib() - before)
    """)
    grown = {}
    for mode in ("mmap", "copy"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                                cwd=tempfile.gettempdir())
        assert result.returncode == 0, result.stderr
        grown[mode] = int(result.stdout.split()[-1]) * 1024
    assert grown["copy"] > 0.9 * weight_bytes, (grown, weight_bytes)
    assert grown["mmap"] < 0.25 * weight_bytes, (grown, weight_bytes)
