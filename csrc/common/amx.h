// What the AMX kernels (q8 and q4 *__amx.cpp) share: the one tile configuration
// they use, every tile 16 rows x 64 bytes (palette 1), and a compiler barrier.
// Internal linkage: included only by TUs built with the amx level's flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pycompress {
namespace {

struct alignas(64) AmxTileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-7, each 16 rows of 64 bytes: an A tile of 16 rows x 64 k (u8), a B tile
// of 16 k-quads x 16 columns (s8), or a C tile of 16 x 16 int32.
inline const AmxTileConfig& amx_tile_config() {
  static const AmxTileConfig config = [] {
    AmxTileConfig c{};
    c.palette = 1;
    for (int i = 0; i < 8; ++i) {
      c.colsb[i] = 64;
      c.rows[i] = 16;
    }
    return c;
  }();
  return config;
}

// Loads the configuration (ldtilecfg: every tile zeroed) on the calling thread.
// No tilerelease after a tile: the next one loads the configuration again (so
// does any other AMX code on the thread), and releasing after each cost ~5%.
// The compiler does not see the tile instructions' memory reads: writes to a
// buffer that a tile then loads must not move past this.
inline void amx_compiler_barrier() { __asm__ volatile("" ::: "memory"); }

inline void amx_begin() {
  _tile_loadconfig(&amx_tile_config());
  amx_compiler_barrier();
}

}  // namespace
}  // namespace pycompress
