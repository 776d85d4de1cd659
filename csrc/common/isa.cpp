#include "common/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if PYCOMPRESS_X86
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace pycompress {

namespace {
constexpr const char* kIsaNames[kIsaCount] = {"scalar", "avx2", "avxvnni", "avx512vnni", "avx512vbmi", "amx"};
}  // namespace

const char* isa_name(Isa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kIsaCount ? kIsaNames[i] : "unknown";
}

Isa parse_isa(const std::string& name) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (name == kIsaNames[i]) return static_cast<Isa>(i);
  }
  if (name == "avx512") return cpu_has_avx512vbmi() ? Isa::Avx512Vbmi : Isa::Avx512Vnni;
  std::string choices;
  for (int i = 0; i < kIsaCount; ++i) choices += std::string(i ? ", " : "") + kIsaNames[i];
  throw std::invalid_argument("unknown ISA '" + name + "': expected one of " + choices + " (or avx512)");
}

std::vector<Isa> compiled_isas() {
#if PYCOMPRESS_X86
  return {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Avx512Vbmi, Isa::Amx};
#else
  return {Isa::Scalar};
#endif
}

namespace {

#if PYCOMPRESS_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux hands out the AMX tile data state (8 KiB of registers a thread) only on
// request, once per process; a tile instruction without it raises SIGILL. The
// request succeeds where the kernel (5.16+) and the hypervisor support it.
bool request_amx_state() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

std::vector<Isa> detect_supported() {
  std::vector<Isa> isas{Isa::Scalar};
#if PYCOMPRESS_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return isas;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  const bool f16c = c & (1u << 29);
  if (!osxsave) return isas;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return isas;
  const bool avx2 = b & (1u << 5);
  const bool bmi2 = b & (1u << 8);
  const bool avx512f = b & (1u << 16);
  const bool avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30);
  const bool avx512vl = b & (1u << 31);
  const bool avx512vnni = c & (1u << 11);
  const bool avx512vbmi = c & (1u << 1);
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  const bool avxvnni = a >= 1 && __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 4));
  if (ymm_state && avx2 && fma && f16c && bmi2) {
    isas.push_back(Isa::Avx2);
    if (avxvnni) isas.push_back(Isa::AvxVnni);
    if (zmm_state && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni) {
      isas.push_back(Isa::Avx512Vnni);
      if (avx512vbmi) {
        isas.push_back(Isa::Avx512Vbmi);
        const bool amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25);
        if (amx_tile && amx_int8 && request_amx_state()) isas.push_back(Isa::Amx);
      }
    }
  }
#endif
  return isas;
}

bool is_supported(Isa isa) {
  for (Isa s : supported_isas()) {
    if (s == isa) return true;
  }
  return false;
}

std::string supported_list() {
  std::string names;
  for (Isa s : supported_isas()) names += std::string(names.empty() ? "" : ", ") + isa_name(s);
  return names;
}

Isa initial_isa() {
  const char* forced = std::getenv("PYCOMPRESS_ISA");
  if (forced == nullptr || *forced == '\0') return best_supported_isa();
  const Isa isa = parse_isa(forced);
  if (!is_supported(isa)) {
    throw std::invalid_argument(std::string("PYCOMPRESS_ISA=") + forced +
                                " is not supported by this CPU (supported: " + supported_list() + ")");
  }
  return isa;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

std::vector<Isa> supported_isas() {
  static const std::vector<Isa> isas = detect_supported();
  return isas;
}

Isa best_supported_isa() { return supported_isas().back(); }

bool cpu_has_avx512vbmi() { return best_supported_isa() >= Isa::Avx512Vbmi; }

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) {
  if (!is_supported(isa)) {
    throw std::invalid_argument(std::string("ISA '") + isa_name(isa) + "' is not supported by this CPU (supported: " +
                                supported_list() + ")");
  }
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
}

}  // namespace pycompress
