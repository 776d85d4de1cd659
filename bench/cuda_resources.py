"""ptxas resource usage of every CUDA kernel (csrc/cuda/*.cu) per architecture: registers, stack, spills,
shared memory, and the occupancy each tile allows. Needs nvcc only (no GPU): it compiles the kernels with the
flags CMakeLists.txt gives _C_cuda (-O3 --fmad=false, warnings as errors) plus -Xptxas -v.

    python bench/cuda_resources.py            # the table for sm_80 and sm_90a (bench/README.md records it)
    python bench/cuda_resources.py --archs 80 90 100

tests/test_cuda.py asserts from it that no kernel spills, whenever nvcc is on PATH.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
# The flags of _C_cuda's CUDA sources in CMakeLists.txt (target_compile_options), the host warnings aside.
NVCC_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-Werror=all-warnings", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]
DEFAULT_ARCHS = ("80", "90a")
# Per-SM limits of each architecture (CUDA C++ Programming Guide, compute capabilities table): 64 Ki 32-bit
# registers, 64 resident warps, 32 resident blocks, usable shared memory (KiB).
SM_LIMITS = {"80": (65536, 64, 32, 164), "86": (65536, 48, 16, 100), "89": (65536, 48, 24, 100),
             "90": (65536, 64, 32, 228), "100": (65536, 64, 32, 228)}
TILE = re.compile(r"Tile<\d+, \d+, \d+, \d+, \d+>")


@dataclasses.dataclass
class Kernel:
    arch: str
    name: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    threads: int
    dynamic_smem: int

    @property
    def occupancy(self) -> tuple[int, float]:
        """(resident blocks per SM, resident warps / the SM's maximum)."""
        regs, max_warps, max_blocks, smem_kib = SM_LIMITS.get(self.arch.rstrip("a"), SM_LIMITS["80"])
        warps = self.threads // 32
        per_warp = -(-self.registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        blocks = min(max_blocks, max_warps // warps, regs // (per_warp * warps))
        if self.dynamic_smem:
            blocks = min(blocks, smem_kib * 1024 // (self.dynamic_smem + 1024))  # 1 KiB reserved per block
        return blocks, blocks * warps / max_warps


def launch_shape(name: str) -> tuple[int, int]:
    """(threads, dynamic shared memory bytes) of a kernel from its demangled name (q8_cuda_tiling.h)."""
    from pycompress import _C

    shapes = _C.cuda_q8_kernels()
    m = TILE.search(name)
    return shapes[m.group(0)] if m else shapes[name.split("<")[0]]


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short(name: str) -> str:
    name = re.sub(r"pycompress::q8cuda::\(anonymous namespace\)::", "", name)
    name = name.replace("pycompress::q8cuda::", "").replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    return re.sub(r"\(.*\)$", "", name).removeprefix("void ")


def _ptxas_report(nvcc: str, source: Path, arch: str) -> list[list]:
    """ptxas's lines for one source and architecture: [mangled name, arch, registers, stack, spill stores, spill
    loads] per entry function. Device code only (-cubin): the CUDA build compiles the host side."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin",
                              str(source), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{run.stderr[-4000:]}")
    raw = []
    entry = None
    for line in run.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_(\w+)'", line):
            entry = [m.group(1), m.group(2), 0, 0, 0, 0]
        elif entry and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                                        r"loads", line)):
            entry[3:6] = map(int, m.groups())
        elif entry and (m := re.search(r"Used (\d+) registers", line)):
            entry[2] = int(m.group(1))
            raw.append(entry)
            entry = None
    return raw


def resources(archs=DEFAULT_ARCHS, nvcc: str | None = None) -> list[Kernel]:
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH")
    jobs = [(source, arch) for source in sorted(CUDA_DIR.glob("*.cu")) for arch in archs]
    # One nvcc a core (each is single-threaded; ptxas dominates).
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda job: _ptxas_report(nvcc, *job), jobs))
    raw = [entry for report in reports for entry in report]
    kernels: list[Kernel] = []
    for (mangled, arch, regs, stack, stores, loads), name in zip(raw, demangle([r[0] for r in raw])):
        threads, smem = launch_shape(short(name))
        kernels.append(Kernel(arch, short(name), regs, stack, stores, loads, threads, smem))
    return kernels


DTYPE_ARG = re.compile(r"(<|, )(float|f16|bf16)>$")


def table(kernels: list[Kernel]) -> str:
    """One row per kernel and architecture, its float32 / float16 / bfloat16 instances together: the most
    registers, stack and spills of the three (and the occupancy those registers allow)."""
    groups: dict[tuple[str, str], list[Kernel]] = {}
    for k in kernels:
        groups.setdefault((DTYPE_ARG.sub(r"\1T>", k.name), k.arch), []).append(k)
    rows = ["| kernel (T: float, f16, bf16) | arch | registers | stack B | spills (st/ld B) | threads | dyn. smem B | "
            "blocks/SM | occupancy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, arch), ks in sorted(groups.items()):
        k = max(ks, key=lambda k: (k.registers, k.stack, k.spill_stores + k.spill_loads))
        blocks, occ = k.occupancy
        rows.append(f"| `{name}` | sm_{arch} | {k.registers} | {k.stack} | {k.spill_stores}/{k.spill_loads} | "
                    f"{k.threads} | {k.dynamic_smem} | {blocks} | {occ:.0%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=list(DEFAULT_ARCHS))
    args = parser.parse_args()
    kernels = resources(args.archs)
    version = subprocess.run([shutil.which("nvcc"), "--version"], capture_output=True, text=True).stdout
    print(f"nvcc: {version.strip().splitlines()[-1]}")
    print(table(kernels))


if __name__ == "__main__":
    main()
