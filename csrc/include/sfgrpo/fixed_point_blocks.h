// How the CUDA advantage engine runs phases 1 and 2 of sfgrpo/fixed_point_advantages.h: the launch
// geometry and one block's work, shared-memory staging included, written once for the kernel
// (warp_rows_kernel and single_launch_kernel, csrc/cuda/advantages.cu) and for the host emulation
// (csrc/cpu/advantages_emulated.cpp), which runs the same grid block by block. So the staging and
// its flush are tested without a GPU, not only the phases.
//
// A grid of blocks_for(rows) blocks of kThreads threads walks the rows in a grid-stride loop over
// warps of 32 consecutive rows (every lane of a warp runs the same iterations: the phases reduce
// across the warp); lanes past the last row are inactive. The few accumulators that every warp
// adds to (the group and non-finite counts in phase 1 when no claim needs its index, the batch's
// range or moment sums with global_std) are staged in shared memory: the block's warps combine
// there, and each word reaches global memory in one atomic per block instead of one per warp
// (same-address atomics serialise in L2). Integer sums and maxima: the same bits in any grouping.
// Rows of up to a few dozen rewards are staged in shared memory too (below, "row staging").
#pragma once
#include <cstdint>

#include "sfgrpo/advantages.h"
#include "sfgrpo/fixed_point_advantages.h"

namespace sfgrpo {
namespace fixed {

// --------------------------------------------------------------------------- launch geometry
constexpr int kThreads = 256;    // per block: 8 warps
constexpr int kMaxBlocks = 4096;  // beyond 4096 * 256 rows the warps take several grid-stride rounds
constexpr int kStagedCounts = 2;  // staged words 0 and 1: the counters (groups, non-finite rows)
constexpr int64_t kMaxStagedWords = 1024;  // 8 KiB of shared memory, the counts' words included

// Blocks of a launch over `items` rows, one per thread (per lane in phases 1 and 2): one block per
// kThreads rows, at least 1, at most kMaxBlocks (the rest in grid-stride rounds).
SFGRPO_HD int blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

// Blocks of a launch capped at `cap` (0: no cap): the cooperative single launch runs no more blocks
// than the device holds at once, and the grid-stride loops cover the rest of the rows.
SFGRPO_HD int grid_blocks(int64_t items, int cap) {
  const int blocks = blocks_for(items);
  return cap > 0 && cap < blocks ? cap : blocks;
}

// Batch words staged by phase 1 (`insert`: the range) or 2 (the moment sums); 0: none, the batch
// accumulators stay in global memory (no global_std, or too many statistics for the staging).
SFGRPO_HD int staged_batch_words(const AdvantageProblem& p, bool insert) {
  const int64_t words = p.stat_columns() * (insert ? kRangeWords : kMomentWords);
  return p.global_std && kStagedCounts + words <= kMaxStagedWords ? static_cast<int>(words) : 0;
}

// Staged words of a block (its shared memory, in words): the counts' slots, then the batch words.
SFGRPO_HD int staged_words(int batch_words) { return kStagedCounts + batch_words; }

// ----------------------------------------------------------------------------------- staging
// What a block of phase 1 (`insert`) or 2 stages.
struct Staging {
  bool insert = false;
  bool counts = false;  // words 0, 1 stand for the counters
  int batch_words = 0;  // then the batch's range (phase 1) or moment sums (phase 2)
};

SFGRPO_HD Staging staging_of(const Workspace& w, bool insert, int batch_words) {
  Staging st;
  st.insert = insert;
  // only phase 1 adds to the counts; with statistics its claims need the global count (each claim's
  // index in the list to sort), so they stay global
  st.counts = insert && w.claim_ids == nullptr;
  st.batch_words = batch_words;
  return st;
}

// `a` with its staged accumulators pointed at the block's `staged` words (zeroed before): the
// warps' atomics on them then land in shared memory.
template <typename T>
SFGRPO_HD Args<T> staged_args(const Args<T>& a, const Staging& st, uint64_t* staged) {
  Args<T> local = a;
  if (st.counts) local.w.counters = staged;
  if (st.batch_words > 0) (st.insert ? local.w.batch_range : local.w.batch_moments) = staged + kStagedCounts;
  return local;
}

// Staged word k's total into its accumulator in `w` (global): the counts and moment sums add, the
// range's order codes take the maximum. 0 is skipped: it adds nothing and is below every code.
SFGRPO_HD void flush_staged_word(const Workspace& w, const Staging& st, int k, uint64_t value) {
  if (value == 0) return;
  if (k < kStagedCounts) {
    if (st.counts) atomic_add(w.counters + k, value);
  } else if (st.insert) {
    atomic_max(w.batch_range + (k - kStagedCounts), value);
  } else {
    atomic_add(w.batch_moments + (k - kStagedCounts), value);
  }
}

// ---------------------------------------------------------------------------------- row staging
// Phases 1 and 2 read a row's rewards in its own lane, several times (finiteness, range, moments):
// from global memory, each load instruction of the warp would touch 32 rows, 32 sectors for 4 or 8
// bytes each (on an H100, 2026-11-27, 78 % of the cooperative kernel's sectors were such excess, and
// waits on L1TEX were half the insert phase's stalls). So each warp first copies its 32 rows to the
// block's shared memory, coalesced (consecutive lanes copy consecutive rewards, with cp.async), and
// its lanes read their rows there: `stage_stride` values apart, an odd number, so the 32 lanes'
// reads of one column fall in 32 distinct banks. The single launch in one round copies them once,
// in phase 1: phases 2 and 3 read them there too. Rows too wide for kStageRowBytes are read from
// global memory.
constexpr int64_t kStageRowBytes = 152;  // with the staged words, a block stays under 48 KiB of shared memory

SFGRPO_HD int64_t stage_stride(int64_t width) { return width | 1; }

// Bytes of shared memory a block's staged rows take (0: rows too wide, read from global memory).
SFGRPO_HD int64_t stage_bytes(const AdvantageProblem& p, int64_t element_bytes) {
  const int64_t row = stage_stride(p.width) * element_bytes;
  return row <= kStageRowBytes ? row * kThreads : 0;
}

constexpr int64_t kMaxStageBytes = kStageRowBytes * kThreads;

// The warp's rows base .. base + 31 (those in the batch) copied to `stage`, the warp's 32 x
// stage_stride(width) values; returns where the phases read them, once they wait() for the copies.
template <typename T>
SFGRPO_HD WarpRows<T> stage_rows(const Args<T>& a, int64_t base, T* stage) {
  const AdvantageProblem& p = a.p;
  const int width = static_cast<int>(p.width);  // staged rows are narrow
  const int stride = static_cast<int>(stage_stride(p.width));
  const int rows = static_cast<int>(p.rows - base < kWarpSize ? p.rows - base : kWarpSize);
  const Tile<T> tile{a.rewards + base * p.width, nullptr, rows * width, width, width, kWarpSize / width,
                     kWarpSize % width};
  Lanes<int> row, column;
  tile.start(row, column);
  warp::sync();  // every lane is done reading what the warp staged before
  for (int first = 0; first < tile.values; first += kWarpSize) {
    warp::each([&](int lane) {
      const int e = first + lane;  // the tile is contiguous: its value e is rewards[e]
      if (e >= tile.values) return;
#if defined(__CUDA_ARCH__)
      // cp.async, global to shared memory without a register: every round's copy is in flight at
      // once, and the warp waits for memory once, in the phase (a load-then-store loop would wait per
      // round)
      __pipeline_memcpy_async(stage + row[lane] * stride + column[lane], tile.rewards + e, sizeof(T));
#else
      stage[row[lane] * stride + column[lane]] = tile.rewards[e];
#endif
    });
    tile.advance(row, column);
  }
#if defined(__CUDA_ARCH__)
  __pipeline_commit();
#endif
  return WarpRows<T>{stage, stride, true};
}

// ------------------------------------------------------------------------------- block model
// Like the warp model: on the device the calling thread's share of the block's work, in the
// emulation all of it, one block at a time (so plain memory stands for the block's shared memory
// and its barriers have nothing to wait for).
struct Block {
  unsigned index = 0;  // blockIdx.x
  unsigned count = 1;  // gridDim.x
};

namespace block {

// f(k) for 0 <= k < n, spread over the block's threads.
template <typename F>
SFGRPO_HD void each_word(int n, F&& f) {
#if defined(__CUDA_ARCH__)
  for (int k = threadIdx.x; k < n; k += blockDim.x) f(k);
#else
  for (int k = 0; k < n; ++k) f(k);
#endif
}

SFGRPO_HD void sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#endif
}

// The first rows of the warps of 32 rows that block b runs, in grid-stride rounds: on the device
// the calling warp's (every lane of it gets the same bases), in the emulation every warp of the
// block, round by round. for (base = first_warp(b); base < rows; base = next_warp(b, base)).
SFGRPO_HD int64_t first_warp(Block b) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(b.index) * blockDim.x + (threadIdx.x & ~31u);
#else
  return static_cast<int64_t>(b.index) * kThreads;
#endif
}

SFGRPO_HD int64_t next_warp(Block b, int64_t base) {
#if defined(__CUDA_ARCH__)
  return base + static_cast<int64_t>(b.count) * blockDim.x;
#else
  // the block's next warp in this round; after its last, the first of its next round (a round's
  // kThreads rows start at a multiple of kThreads)
  const int64_t next = base + kWarpSize;
  return next % kThreads != 0 ? next : next - kThreads + static_cast<int64_t>(b.count) * kThreads;
#endif
}

}  // namespace block

// Whether a grid of b.count blocks takes every row in its first round.
SFGRPO_HD bool one_round(int64_t rows, Block b) { return static_cast<int64_t>(b.count) * kThreads >= rows; }

// The warp at `base`'s slice of its block's stage (a warp keeps its place, so its slice, in every
// round and phase).
template <typename T>
SFGRPO_HD T* stage_slice(T* stage, int64_t base, int64_t stride) {
  return stage + (base % kThreads) / kWarpSize * kWarpSize * stride;
}

// Where phase 3 reads the warp's rows: the stage that still holds them (`kept`, non-null: the
// cooperative launch in one round), else the rewards.
template <typename T>
SFGRPO_HD WarpRows<T> kept_or_global_rows(const Args<T>& a, int64_t base, const T* kept) {
  const int64_t stride = stage_stride(a.p.width);
  return kept != nullptr ? WarpRows<T>{stage_slice(kept, base, stride), stride} : global_rows(a, base);
}

// Block b of phase 1 (kInsert) or 2, `staged` its shared memory (staged_words(batch_words) words,
// any contents): the staged words zeroed, the block's warps run the phase with their common
// accumulators there, then each word's total goes to global memory in one atomic. `stage`: the
// block's shared memory for its rows (stage_bytes(p, sizeof(T)) bytes), nullptr to read them from
// global memory; `kept`: it still holds the rows the block's warps staged in the phase before (the
// cooperative launch's phase 2 when one round covers the batch: same block, warps and rows), else
// any contents.
template <bool kInsert, typename T>
SFGRPO_HD void warp_rows_block(const Args<T>& a, int batch_words, uint64_t* staged, T* stage, bool kept, Block b) {
  const Staging st = staging_of(a.w, kInsert, batch_words);
  const int words = staged_words(batch_words);
  block::each_word(words, [&](int k) { staged[k] = 0; });
  block::sync();
  const Args<T> local = staged_args(a, st, staged);
  const int64_t stride = stage_stride(a.p.width);
  for (int64_t base = block::first_warp(b); base < a.p.rows; base = block::next_warp(b, base)) {
    WarpRows<T> rows = global_rows(a, base);
    if (stage != nullptr) {
      T* slice = stage_slice(stage, base, stride);
      rows = kept ? WarpRows<T>{slice, stride} : stage_rows(a, base, slice);
    }
    if (kInsert) {
      insert_warp(local, base, rows);
    } else {
      moments_warp(local, base, rows);
    }
  }
  block::sync();  // every warp's atomics are in
  block::each_word(words, [&](int k) { flush_staged_word(a.w, st, k, staged[k]); });
}

}  // namespace fixed
}  // namespace sfgrpo
