// Instruction-set detection and the runtime dispatch table.
//
// Every kernel has a portable scalar path (the executable specification) and
// optional x86 paths compiled in their own translation units with that ISA's
// flags only. The table is picked once from cpuid; PYCOMPRESS_ISA (or
// set_active_isa) forces a lower path so tests can run every path the CPU has.
//
// The levels, lowest first; each names what its kernels need, not a CPU:
//   scalar      portable C++ (any CPU)
//   avx2        AVX2 + FMA + F16C + BMI2 (Haswell, Zen 1 and later)
//   avxvnni     avx2 + AVX-VNNI: ymm vpdpbusd (Alder Lake, Sapphire Rapids, Zen 5)
//   avx512vnni  AVX-512 F/BW/DQ/VL + VNNI (Cascade Lake, Ice Lake, Zen 4)
//   avx512vbmi  avx512vnni + VBMI: vpermb (Ice Lake, Sapphire Rapids, Zen 4)
//   amx         avx512vbmi + AMX-TILE + AMX-INT8: tdpbusd on 16x64-byte tiles
//               (Sapphire Rapids, Emerald Rapids, Granite Rapids); the OS must
//               grant the tile state (Linux 5.16+: arch_prctl ARCH_REQ_XCOMP_PERM)
// A CPU supports a level when it has that level's own features (Zen 4 and Ice
// Lake support avx512vnni without avxvnni); an op without kernels of its own at
// a level runs those of the highest level below it (pick_kernels).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pycompress {

enum class Isa : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3, Avx512Vbmi = 4, Amx = 5 };
constexpr int kIsaCount = 6;

const char* isa_name(Isa isa);
// Parses a level's name, or "avx512" (the highest AVX-512 level this CPU
// supports, AVX-512 VNNI where it supports none: the name of releases before
// the split); throws std::invalid_argument naming the choices otherwise.
Isa parse_isa(const std::string& name);

// ISAs compiled into this build, lowest first.
std::vector<Isa> compiled_isas();
// ISAs this CPU (and OS, for the AVX register state) can execute, lowest first.
std::vector<Isa> supported_isas();
Isa best_supported_isa();

// Whether the CPU has AVX-512 VBMI (the avx512vbmi level is supported); what
// the kernels use is the active level, not this.
bool cpu_has_avx512vbmi();

Isa active_isa();
// Throws std::invalid_argument naming the ISA when the CPU or build lacks it.
void set_active_isa(Isa isa);

// An op's kernel table for `isa`: tables[level] for each level the op has
// kernels at (nullptr elsewhere); a level without its own runs the highest
// level's below it. tables[0] (scalar) is required.
template <class Table>
const Table& pick_kernels(Isa isa, const Table& (*const (&tables)[kIsaCount])()) {
  for (int level = static_cast<int>(isa); level > 0; --level) {
    if (tables[level] != nullptr) return tables[level]();
  }
  return tables[0]();
}

}  // namespace pycompress

// A kernel-table function that exists only in x86 builds, for pick_kernels.
#if PYCOMPRESS_X86
#define PYCOMPRESS_X86_TABLE(fn) &fn
#else
#define PYCOMPRESS_X86_TABLE(fn) nullptr
#endif
