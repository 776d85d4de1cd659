// Instruction-set detection and the runtime dispatch table.
//
// Every kernel has a portable scalar path (the executable specification) and
// optional x86 paths compiled in their own translation units with that ISA's
// flags only. The table is picked once from cpuid; PYCOMPRESS_ISA (or
// set_active_isa) forces a lower path so tests can run every path the CPU has.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pycompress {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

const char* isa_name(Isa isa);
// Parses "scalar" | "avx2" | "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);

// ISAs compiled into this build, lowest first.
std::vector<Isa> compiled_isas();
// ISAs this CPU (and OS, for the AVX register state) can execute, lowest first.
std::vector<Isa> supported_isas();
Isa best_supported_isa();

// AVX-512 VBMI (vpermb) on top of the AVX-512 VNNI path: an optional extension
// a few kernels use (Ice Lake, Zen 4 and later have it; Cascade Lake does not).
bool cpu_has_avx512vbmi();

Isa active_isa();
// Throws std::invalid_argument naming the ISA when the CPU or build lacks it.
void set_active_isa(Isa isa);

}  // namespace pycompress
