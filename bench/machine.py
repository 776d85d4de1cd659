"""What the benchmark tables need to know about the machine: CPU, caches, ceilings.

The ceilings (multiply-add peaks and a plain read loop's bandwidth) come from
bench/peak/vnni_peak.cpp, compiled here with g++ at bench time (never part of
the package build) into a temporary folder. `python bench/machine.py` prints
them; the bench tables give our fraction of the one that bounds each row.
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
# Each kernel needs these /proc/cpuinfo flags; without them it would fault (the
# program checks CPUID itself too, and says "unsupported").
PEAK_KERNELS = {
    "tdpbusd": ("amx_tile", "amx_int8"),
    "vpdpbusd_zmm": ("avx512f", "avx512_vnni"),
    "vpdpbusd_ymm": ("avx2", "avx_vnni"),
    "vpmaddwd_ymm": ("avx2",),
    "vpmaddubsw_ymm": ("avx2",),
    "fma_zmm": ("avx512f", "fma"),
    "fma_ymm": ("avx2", "fma"),
}
PEAK_DESCRIPTIONS = {
    "tdpbusd": "int8: AMX tdpbusd (exact u8 x s8, 16x16x64 a tile)",
    "vpdpbusd_zmm": "int8: AVX-512 VNNI vpdpbusd zmm (exact u8 x s8)",
    "vpdpbusd_ymm": "int8: AVX-VNNI vpdpbusd ymm (exact u8 x s8)",
    "vpmaddwd_ymm": "int8: AVX2 vpmaddwd + vpaddd ymm (exact, operands widened to s16)",
    "vpmaddubsw_ymm": "int8: AVX2 vpmaddubsw + vpmaddwd(1) + vpaddd ymm (exact for u7 only)",
    "fma_zmm": "fp32: FMA zmm",
    "fma_ymm": "fp32: FMA ymm",
}

# The int8 multiply ceiling of each ISA tier of pycompress (pycompress.get_isa()):
# the instruction its GEMM's inner loop runs on. Both the names before AVX-512 was
# split ("avx512") and after ("avx512vnni", "avx512vbmi", and "avxvnni": AVX2
# kernels with a ymm vpdpbusd int8 GEMM). For avx2 the second entry is the u7
# path's ceiling (vpmaddubsw, the peers' way), reported beside the exact one.
ISA_INT8_CEILINGS: dict[str, tuple[str, ...]] = {
    "avx512": ("vpdpbusd_zmm",),
    "avx512vnni": ("vpdpbusd_zmm",),
    "avx512vbmi": ("vpdpbusd_zmm",),
    "amx": ("tdpbusd",),
    "avxvnni": ("vpdpbusd_ymm",),
    "avx2": ("vpmaddwd_ymm", "vpmaddubsw_ymm"),
}
SHORT_KERNEL_NAMES = {"tdpbusd": "AMX tdpbusd", "vpdpbusd_zmm": "vpdpbusd zmm", "vpdpbusd_ymm": "vpdpbusd ymm",
                      "vpmaddwd_ymm": "vpmaddwd", "vpmaddubsw_ymm": "u7 vpmaddubsw"}

# Read-loop buffers: where the weights of a GEMV row live (where_weights_fit).
READ_LEVELS = ("L2", "L3", "DRAM")


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


def _run_peak(args: list[str]) -> float | None:
    """One run of the peak program: its figure, or None when the CPU lacks the kernel."""
    binary = _compile_peak_binary()
    if binary is None:
        return None
    out = subprocess.run([str(binary), *args], capture_output=True, text=True)
    if out.returncode == 3:  # "<kernel> unsupported": CPUID says no
        return None
    if out.returncode != 0:
        raise RuntimeError(f"vnni_peak {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return float(out.stdout.split()[2])


@functools.cache
def measure_peaks(seconds: float = 0.5) -> dict[tuple[str, int], float]:
    """{(kernel, threads): GOPS} for each kernel this CPU can run, at each thread
    count of shapes.THREADS (ops = 2 x MACs). Measured once per process."""
    peaks: dict[tuple[str, int], float] = {}
    for kernel, needs in PEAK_KERNELS.items():
        if not all(flag in cpu_flags() for flag in needs):
            continue
        for t in THREADS:
            gops = _run_peak([kernel, str(t), str(seconds)])
            if gops is not None:
                peaks[(kernel, t)] = gops
    return peaks


def read_buffer_bytes(level: str, threads: int) -> int | None:
    """The read loop's buffer for `level`: half of the L2 of each core in use, half
    of the L3 (the size of the (1,4096,4096) int8 weights on a 32 MiB L3), or 4x
    the L3 (at least 64 MiB) for DRAM. None when the cache size is unknown."""
    caches = cache_sizes()
    if level == "L2":
        return caches["L2"] // 2 * threads if "L2" in caches else None
    if level == "L3":
        return caches["L3"] // 2 if "L3" in caches else None
    return max(64 * MIB, 4 * caches.get("L3", 64 * MIB))


@functools.cache
def measure_read_bandwidth(seconds: float = 0.3) -> dict[tuple[str, int], float]:
    """{(level, threads): GB/s} of a plain read loop (bench/peak, read_ymm) over a
    buffer that lives in `level` ('L2', 'L3', 'DRAM'), split between the threads
    as a GEMV's weights are. Measured once per process."""
    result: dict[tuple[str, int], float] = {}
    if "avx2" not in cpu_flags():
        return result
    for level in READ_LEVELS:
        for t in THREADS:
            size = read_buffer_bytes(level, t)
            if size is None:
                continue
            gbs = _run_peak(["read_ymm", str(t), str(seconds), str(size)])
            if gbs is not None:
                result[(level, t)] = gbs
    return result


def int8_ceiling_kernels(isa: str) -> tuple[str, ...]:
    """The peak kernels that bound pycompress's int8 GEMM on ISA tier `isa` (see
    ISA_INT8_CEILINGS; an unknown avx512* name is taken as an AVX-512 VNNI tier)."""
    if isa in ISA_INT8_CEILINGS:
        return ISA_INT8_CEILINGS[isa]
    return ISA_INT8_CEILINGS["avx512vnni"] if isa.startswith("avx512") else ()


def int8_peak_gops(threads: int, isa: str) -> float | None:
    """The int8 multiply ceiling of pycompress's ISA path `isa` (pycompress.get_isa()):
    vpdpbusd zmm for the AVX-512 tiers, vpdpbusd ymm for 'avxvnni', the exact
    widened vpmaddwd for 'avx2', none for 'scalar'."""
    kernels = int8_ceiling_kernels(isa)
    return measure_peaks().get((kernels[0], threads)) if kernels else None


def int8_ceiling_cell(gops: float, threads: int, isa: str) -> str:
    """'88% of 469 vpdpbusd zmm' for a compute-bound row (both ceilings on avx2)."""
    parts = []
    for kernel in int8_ceiling_kernels(isa):
        peak = measure_peaks().get((kernel, threads))
        if peak:
            parts.append(f"{100 * gops / peak:.0f}% of {peak:.0f} {SHORT_KERNEL_NAMES.get(kernel, kernel)}")
    return ", ".join(parts) or "n/a"


def read_bandwidth_gbs(level: str, threads: int) -> float | None:
    """The read loop's GB/s from `level` on `threads` threads (None: not measured)."""
    return measure_read_bandwidth().get((level, threads))


def bandwidth_cell(gbs: float, level: str, threads: int) -> str:
    """'63 GB/s (95% of L3 66)' for a GEMV row whose weights live in `level`."""
    loop = read_bandwidth_gbs(level, threads)
    if not loop:
        return f"{gbs:.0f} GB/s"
    return f"{gbs:.0f} GB/s ({100 * gbs / loop:.0f}% of {level} {loop:.0f})"


def second_core_warning() -> str | None:
    """A warning when the 2-thread peak shows the second core was busy (another job)."""
    peaks = measure_peaks()
    for kernel in PEAK_KERNELS:
        one, two = peaks.get((kernel, 1)), peaks.get((kernel, 2))
        if one and two:
            if two < 1.6 * one:
                return (f"WARNING: the 2-thread {kernel} peak is only {two / one:.2f}x the 1-thread one: the second "
                        "core was busy with another job, so every 2-thread figure of this run is unreliable.")
            return None
    return None


def format_ceilings() -> str:
    """The ceilings as markdown tables: multiply-add peaks, then read-loop bandwidth."""
    peaks = measure_peaks()
    if not peaks:
        return "(no g++: ceilings not measured)"
    lines = ["| multiply-add peak (bench/peak/vnni_peak.cpp) | kernel | "
             + " | ".join(f"{t} thr GOPS" for t in THREADS) + " |",
             "|---|---|" + "---:|" * len(THREADS)]
    for kernel in PEAK_KERNELS:
        if any((kernel, t) in peaks for t in THREADS):
            lines.append(f"| {PEAK_DESCRIPTIONS[kernel]} | {kernel} | "
                         + " | ".join(f"{peaks[(kernel, t)]:.0f}" if (kernel, t) in peaks else "n/a" for t in THREADS)
                         + " |")
    absent = [k for k in PEAK_KERNELS if not any((k, t) in peaks for t in THREADS)]
    if absent:
        lines.append(f"\nnot on this CPU: {', '.join(absent)}")
    reads = measure_read_bandwidth()
    if reads:
        lines += ["", "| read loop (read_ymm: plain loads, buffer split between threads) | buffer | "
                  + " | ".join(f"{t} thr GB/s" for t in THREADS) + " |",
                  "|---|---|" + "---:|" * len(THREADS)]
        for level in READ_LEVELS:
            if any((level, t) in reads for t in THREADS):
                sizes = list(dict.fromkeys(format_bytes(read_buffer_bytes(level, t)) for t in THREADS))
                lines.append(f"| {level} | {' / '.join(sizes)} | "
                             + " | ".join(f"{reads[(level, t)]:.0f}" if (level, t) in reads else "n/a"
                                          for t in THREADS) + " |")
    warning = second_core_warning()
    if warning:
        lines += ["", warning]
    return "\n".join(lines)


def describe_isa_ceilings() -> str:
    """Which ceiling bounds each pycompress ISA tier, and the active tier if pycompress imports."""
    try:
        import pycompress

        active = f"pycompress's active ISA: {pycompress.get_isa()}"
    except Exception as error:  # noqa: BLE001  (machine.py runs without the package too)
        active = f"pycompress not importable ({type(error).__name__})"
    tiers = "; ".join(f"{isa} -> {' + '.join(kernels)}" for isa, kernels in ISA_INT8_CEILINGS.items())
    return f"int8 ceiling per ISA tier: {tiers}. {active}"


if __name__ == "__main__":
    print(cpu_model())
    print("caches:", describe_caches())
    print("SIMD flags:", simd_flags())
    print(describe_isa_ceilings())
    print()
    print(format_ceilings())
