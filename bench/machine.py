"""What the benchmark tables need to know about the machine: CPU, caches, peaks.

The multiply-add peaks come from bench/peak/vnni_peak.cpp, compiled here with
g++ at bench time (never part of the package build) into a temporary folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from shapes import MIB, THREADS

PEAK_SOURCE = Path(__file__).resolve().parent / "peak" / "vnni_peak.cpp"
# Each kernel needs these /proc/cpuinfo flags; without them it would fault.
PEAK_KERNELS = {
    "vpdpbusd_zmm": ("avx512f", "avx512_vnni"),
    "vpmaddwd_ymm": ("avx2",),
    "fma_zmm": ("avx512f", "fma"),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu unavailable)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    family, model = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
    cores = fields.get("CPU(s)", "?").strip()
    return f"{name} (family {family}, model {model}), {cores} CPUs"


def load_average() -> float | None:
    """The 1-minute load average: above ~0.5 on 2 cores, other jobs share the machine."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def simd_flags() -> str:
    """The lscpu flags that matter for these kernels."""
    wanted = ("avx", "fma", "vnni", "amx", "bf16", "f16")
    return " ".join(sorted(f for f in cpu_flags() if any(w in f for w in wanted)))


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


@functools.cache
def cache_sizes() -> dict[str, int]:
    """{'L2': bytes per core, 'L3': bytes shared} from sysfs (cpu0's view); missing levels absent."""
    sizes: dict[str, int] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Unified", "Data"):
            sizes[f"L{level}"] = size
    return sizes


def where_weights_fit(weight_bytes: int, threads: int) -> str:
    """'L2' when the weights fit the L2 of the cores in use (each thread reads its
    share of the columns), 'L3' when they fit the shared L3, else 'DRAM'."""
    caches = cache_sizes()
    if "L2" in caches and weight_bytes <= caches["L2"] * threads:
        return "L2"
    if "L3" in caches and weight_bytes <= caches["L3"]:
        return "L3"
    return "DRAM" if caches else "?"


def describe_caches() -> str:
    caches = cache_sizes()
    return ", ".join(f"{k} {format_bytes(v)}" + (" per core" if k in ("L1", "L2") else "")
                     for k, v in sorted(caches.items())) or "unknown"


def format_bytes(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n / 1024:g} KiB"


def _compile_peak_binary() -> Path | None:
    """Compiles vnni_peak.cpp once per source version; None when g++ is missing."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    source = PEAK_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"pycompress-bench-{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    binary = out_dir / f"vnni_peak-{digest}"
    if not binary.exists():
        # Per-function target attributes in the source select each kernel's ISA,
        # so the binary also runs (and reports what it can) on a CPU without AVX-512.
        tmp = binary.with_suffix(".tmp")
        subprocess.run([compiler, "-O2", "-std=c++17", "-pthread", str(PEAK_SOURCE), "-o", str(tmp)], check=True)
        tmp.replace(binary)
    return binary


@functools.cache
def measure_peaks(seconds: float = 0.5) -> dict[tuple[str, int], float]:
    """{(kernel, threads): GOPS} for each kernel this CPU can run, at each thread
    count of shapes.THREADS (ops = 2 x MACs). Measured once per process."""
    binary = _compile_peak_binary()
    if binary is None:
        return {}
    peaks: dict[tuple[str, int], float] = {}
    for kernel, needs in PEAK_KERNELS.items():
        if not all(flag in cpu_flags() for flag in needs):
            continue
        for t in THREADS:
            out = subprocess.run([str(binary), kernel, str(t), str(seconds)], capture_output=True, text=True,
                                 check=True).stdout.split()
            peaks[(kernel, t)] = float(out[2])
    return peaks


def int8_peak_gops(threads: int, isa: str) -> float | None:
    """The int8 limit of pycompress's active ISA path (pycompress.get_isa()):
    vpdpbusd for 'avx512', the exact widened vpmaddwd for 'avx2', none for 'scalar'."""
    kernel = {"avx512": "vpdpbusd_zmm", "avx2": "vpmaddwd_ymm"}.get(isa)
    return None if kernel is None else measure_peaks().get((kernel, threads))


if __name__ == "__main__":
    print(cpu_model())
    print("caches:", describe_caches())
    print("SIMD flags:", simd_flags())
    for (kernel, t), gops in measure_peaks().items():
        print(f"{kernel:14s} threads={t}  {gops:8.1f} GOPS")
