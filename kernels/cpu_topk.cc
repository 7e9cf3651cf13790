// Exact running top-k of dot-product scores on a CPU device, as an XLA FFI handler.
//
// A register-blocked matmul (6 queries × 16 gallery rows per micro-tile) whose scores go
// straight from registers into per-query candidate pools: no score tile is ever written.
// A query's pool holds, unordered, every entry that ranked before its threshold when it
// came — (score descending, id ascending) — and the threshold is the k-th best entry as of
// the pool's last compaction, so the pool always contains the query's true top-k. A
// micro-tile row is checked against the threshold in two vector compares; an entry that
// passes is appended; a full pool is compacted to its k best (a histogram finds the bin
// of the k-th, and only that bin's entries are ordered) and the k-th becomes the
// threshold. Amortised O(1) per entry for any k, and in a long stream almost nothing
// passes, so selection costs ~1% of the matmul.
//
// Every score is the same chain of fused multiply-adds in feature order, starting from 0,
// whatever the tile, block, thread or position of its row: duplicate rows score
// identically (ties are decided by id, not by rounding), and results do not depend on how
// the gallery is cut into tiles or devices. (Host BLAS sgemm kernels do not promise this:
// OpenBLAS's values move by ulps with a row's position in the call.) The AVX-512 path runs
// 16 such chains per vector lane-wise (a micro-tile of 6 queries × two strips), the AVX2
// path 8, the portable path one at a time with fmaf: the three give the same bits.
//
// Blocking follows BLIS: a block of gallery rows is packed feature-major into strips of 16
// (8 × 8 register transposes), a group of query panels waits in L2, and features go in
// chunks so that a strip's chunk stays in L1 while the group's panels stream past it. The
// packed buffers start on cache lines: a strip's 16 floats of one feature are one line.
// Partial sums wait in memory between chunks; an f32 stored and reloaded is unchanged, so
// every score is still one FMA chain.
//
// Threads split the queries; each packs its own copy of every gallery block, so they never
// synchronise within a call. Packing also yields each row's squared norm (one FMA chain in
// feature order): the engine's bad-row check, and cosine's column scale, without another
// pass over the tile.
//
// The tile's rows are read from anywhere inside a flat buffer (row r at row_offset + r·D):
// the engine hands over host rows that do not start on a 64-byte boundary as an aligned
// window of the memory around them, which XLA takes without a copy.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PLATO_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 6;   // queries per micro-tile
constexpr int64_t kCols = 16;  // gallery rows per micro-tile

inline bool RanksBefore(float v, int32_t id, float other_v, int32_t other_id) {
  return v > other_v || (v == other_v && id < other_id);
}

struct Entry {
  float value;
  int32_t id;
};

struct Problem {
  const float* rows;           // row r of the tile at rows + r * dim
  const int32_t* gallery_ids;  // [T], < 0: padding
  const int32_t* query_ids;    // [Q]
  float* values;               // [Q, capacity] pools; unused slots hold (-inf, -1)
  int32_t* ids;
  int32_t* count;              // [Q] entries in each pool
  float* threshold_value;      // [Q] an entry must rank before (value, id) to enter
  int32_t* threshold_id;
  float* row_sumsq;            // [T] squared norms (written by the first thread)
  int64_t k, capacity, num_t, dim;
  bool normalize;              // scale each column by 1 / its row's norm (0 for a zero row)
  bool avx2;                   // the AVX2/FMA path (else the portable one)
  bool avx512;                 // its micro-tiles on AVX-512F, two strips at a time
};

// Instruction sets, as the `isa` attribute names them.
enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Per-thread scratch space of the compactions.
struct Scratch {
  std::vector<int32_t> bins;  // each pool entry's histogram bin
  std::vector<Entry> ties;    // the entries of the bin that holds the k-th
};

constexpr int64_t kBins = 1024;  // compaction's histogram

#ifdef PLATO_X86
// For each 8-bit lane mask, a lane order that puts the set lanes first (AVX2 has no
// compress-store).
struct CompressOrder {
  alignas(32) int32_t lanes[256][8] = {};
  constexpr CompressOrder() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int j = 0; j < 8; ++j) if (m >> j & 1) lanes[m][n++] = j;
      for (int j = 0; j < 8; ++j) if (!(m >> j & 1)) lanes[m][n++] = j;
    }
  }
};
constexpr CompressOrder kCompressOrder;

// Appends the lanes of `take` (values v, ids id) to a pool at `values`/`ids`, set lanes
// first; the 8 - popcount slots after them get (-inf, -1), which unused slots hold anyway.
__attribute__((target("avx2,fma"))) int64_t AppendLanes(float* values, int32_t* ids,
                                                       __m256 v, __m256i id, __m256 take) {
  const int mask = _mm256_movemask_ps(take);
  const __m256i perm =
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompressOrder.lanes[mask]));
  v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, take);
  id = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(-1)), _mm256_castsi256_ps(id), take));
  _mm256_storeu_ps(values, _mm256_permutevar8x32_ps(v, perm));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids), _mm256_permutevar8x32_epi32(id, perm));
  return __builtin_popcount(mask);
}

// The smallest and largest of values[0, n) (n >= 1, no NaN).
__attribute__((target("avx2,fma"))) void MinMaxAvx2(const float* values, int64_t n, float& lo,
                                                    float& hi) {
  __m256 vlo = _mm256_set1_ps(values[0]), vhi = vlo;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(values + j);
    vlo = _mm256_min_ps(vlo, v), vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, vlo), _mm256_store_ps(h, vhi);
  lo = *std::min_element(l, l + 8), hi = *std::max_element(h, h + 8);
  for (; j < n; ++j) lo = std::min(lo, values[j]), hi = std::max(hi, values[j]);
}

// bins[j] = min(kBins - 1, int((values[j] - lo) * scale)), as BinsPortable computes it.
__attribute__((target("avx2,fma"))) void BinsAvx2(const float* values, int64_t n, float lo,
                                                  float scale, int32_t* bins) {
  const __m256 vlo = _mm256_set1_ps(lo), vscale = _mm256_set1_ps(scale);
  const __m256i top = _mm256_set1_epi32(kBins - 1);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(values + j), vlo), vscale);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bins + j),
                        _mm256_min_epi32(_mm256_cvttps_epi32(x), top));
  }
  for (; j < n; ++j) {
    bins[j] = std::min<int32_t>(kBins - 1, static_cast<int32_t>((values[j] - lo) * scale));
  }
}

// Moves the entries of bins above `bin` to the front (in order; returns how many) and
// appends those of `bin` itself to `ties`, eight entries at a time.
__attribute__((target("avx2,fma"))) int64_t PartitionAvx2(float* values, int32_t* ids,
                                                          const int32_t* bins, int64_t n,
                                                          int32_t bin, std::vector<Entry>& ties) {
  const __m256i vbin = _mm256_set1_epi32(bin);
  int64_t kept = 0, j = 0;
  for (; j + 8 <= n; j += 8) {  // kept <= j: the 8 lanes stored at kept were loaded already
    const __m256 v = _mm256_loadu_ps(values + j);
    const __m256i id = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ids + j));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bins + j));
    for (int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(b, vbin))); mask;
         mask &= mask - 1) {
      const int lane = __builtin_ctz(mask);
      ties.push_back({values[j + lane], ids[j + lane]});
    }
    kept += AppendLanes(values + kept, ids + kept, v, id,
                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, vbin)));
  }
  for (; j < n; ++j) {
    const float v = values[j];
    const int32_t id = ids[j];
    if (bins[j] == bin) ties.push_back({v, id});
    values[kept] = v, ids[kept] = id;
    kept += bins[j] > bin;
  }
  return kept;
}
#endif

void MinMaxPortable(const float* values, int64_t n, float& lo, float& hi) {
  lo = hi = values[0];
  for (int64_t j = 1; j < n; ++j) lo = std::min(lo, values[j]), hi = std::max(hi, values[j]);
}

void BinsPortable(const float* values, int64_t n, float lo, float scale, int32_t* bins) {
  for (int64_t j = 0; j < n; ++j) {
    bins[j] = std::min<int32_t>(kBins - 1, static_cast<int32_t>((values[j] - lo) * scale));
  }
}

int64_t PartitionPortable(float* values, int32_t* ids, const int32_t* bins, int64_t n,
                          int32_t bin, std::vector<Entry>& ties) {
  int64_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {  // kept <= j: entries move forward only
    const float v = values[j];
    const int32_t id = ids[j];
    if (bins[j] == bin) ties.push_back({v, id});
    values[kept] = v, ids[kept] = id;
    kept += bins[j] > bin;  // no branch: about half the entries are above
  }
  return kept;
}

#ifndef PLATO_X86  // p.avx2 is never set off x86: these names only keep one dispatch
constexpr auto MinMaxAvx2 = MinMaxPortable;
constexpr auto BinsAvx2 = BinsPortable;
constexpr auto PartitionAvx2 = PartitionPortable;
#endif

// Keeps the k best entries of query q's full pool, (score descending, id ascending), and
// makes the k-th its threshold. A histogram over [min, max] finds the bin holding the k-th
// value (binning by (v - min) * scale is monotone in v); one pass keeps the entries of the
// bins above it and sets that bin's aside, and only those are ordered. Every pass but the
// histogram's runs eight entries at a time: no nth_element over the whole pool.
void Compact(const Problem& p, int64_t q, Scratch& scratch) {
  float* values = p.values + q * p.capacity;
  int32_t* ids = p.ids + q * p.capacity;
  const int64_t n = p.count[q], k = p.k;
  scratch.bins.resize(p.capacity);
  int32_t* bins = scratch.bins.data();
  float lo, hi;
  if (p.avx2) MinMaxAvx2(values, n, lo, hi); else MinMaxPortable(values, n, lo, hi);
  const float scale = static_cast<float>(kBins - 1) / (hi - lo);
  if (std::isfinite(hi - lo) && std::isfinite(scale) && scale > 0.0f) {
    if (p.avx2) BinsAvx2(values, n, lo, scale, bins); else BinsPortable(values, n, lo, scale, bins);
  } else {  // all equal, or a range past f32 (infinite scores): one bin, all ordered
    std::fill(bins, bins + n, 0);
  }
  // Two histograms, even and odd entries: neighbours often share a bin, and a counter
  // incremented twice in a row waits for its own store.
  int32_t counts[2][kBins] = {};
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) ++counts[0][bins[j]], ++counts[1][bins[j + 1]];
  if (j < n) ++counts[0][bins[j]];
  auto in_bin = [&](int32_t b) { return counts[0][b] + counts[1][b]; };
  int32_t bin = kBins - 1;
  for (int64_t above = 0; above + in_bin(bin) < k; --bin) above += in_bin(bin);
  scratch.ties.clear();
  const int64_t kept = p.avx2 ? PartitionAvx2(values, ids, bins, n, bin, scratch.ties)
                              : PartitionPortable(values, ids, bins, n, bin, scratch.ties);
  const int64_t need = k - kept;  // 1 <= need <= ties
  auto before = [](const Entry& a, const Entry& b) {
    return RanksBefore(a.value, a.id, b.value, b.id);
  };
  std::nth_element(scratch.ties.begin(), scratch.ties.begin() + (need - 1), scratch.ties.end(),
                   before);
  for (int64_t t = 0; t < need; ++t) {
    values[kept + t] = scratch.ties[t].value, ids[kept + t] = scratch.ties[t].id;
  }
  std::fill(values + k, values + n, -INFINITY);
  std::fill(ids + k, ids + n, -1);
  p.count[q] = static_cast<int32_t>(k);
  p.threshold_value[q] = scratch.ties[need - 1].value;
  p.threshold_id[q] = scratch.ties[need - 1].id;
}

// Offers query q the finished score of column col + j of `raw` (scaled by `scale[j]`), for
// each j in `lanes`.
void Offer(const Problem& p, int64_t q, int64_t col, const float* raw, const float* scale,
           uint32_t lanes, Scratch& scratch) {
  const int32_t own = p.query_ids[q];
  for (; lanes; lanes &= lanes - 1) {
    const int64_t j = __builtin_ctz(lanes);
    float v = raw[j] * scale[j];
    const int32_t id = p.gallery_ids[col + j];
    if (id < 0 || id == own) continue;  // padding; the query's own row
    if (v == 0.0f) v = 0.0f;            // -0 ranks (and is kept) as +0
    if (!RanksBefore(v, id, p.threshold_value[q], p.threshold_id[q])) continue;
    const int64_t slot = p.count[q]++;
    p.values[q * p.capacity + slot] = v;
    p.ids[q * p.capacity + slot] = id;
    if (slot + 1 == p.capacity) Compact(p, q, scratch);
  }
}

// Packs rows [r0, r0 + rows) of x [*, dim] feature-major: out[f * width + r] (zero-padded).
void Pack(const float* x, int64_t r0, int64_t rows, int64_t width, int64_t dim, float* out) {
  for (int64_t f = 0; f < dim; ++f) {
    float* o = out + f * width;
    for (int64_t r = 0; r < rows; ++r) o[r] = x[(r0 + r) * dim + f];
    for (int64_t r = rows; r < width; ++r) o[r] = 0.0f;
  }
}

// acc[r][c] continues its fmaf chain over `depth` more features (from 0 when `fresh`).
// a: a packed query panel from the chunk's first feature; b: a packed strip, likewise.
void MicroTilePortable(const float* a, const float* b, int64_t depth, float* acc, bool fresh) {
  if (fresh) std::fill(acc, acc + kRows * kCols, 0.0f);
  for (int64_t f = 0; f < depth; ++f) {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t c = 0; c < kCols; ++c) {
        acc[r * kCols + c] = std::fma(a[f * kRows + r], b[f * kCols + c], acc[r * kCols + c]);
      }
    }
  }
}

// Offers the finished scores of a micro-tile (acc [kRows][kCols], columns col.. of which
// the first n are rows of the tile) to queries q0..q0 + rows.
void FinishTilePortable(const Problem& p, const float* acc, const float* scale, int64_t q0,
                        int64_t rows, int64_t col, int64_t n, Scratch& scratch) {
  for (int64_t r = 0; r < rows; ++r) {
    Offer(p, q0 + r, col, acc + r * kCols, scale, (1u << n) - 1, scratch);
  }
}

// Squared norms of a packed strip's kCols rows: one fmaf chain per row, in feature order.
void StripSumSqPortable(const float* b, int64_t dim, float* out) {
  for (int64_t c = 0; c < kCols; ++c) out[c] = 0.0f;
  for (int64_t f = 0; f < dim; ++f) {
    for (int64_t c = 0; c < kCols; ++c) {
      out[c] = std::fma(b[f * kCols + c], b[f * kCols + c], out[c]);
    }
  }
}

#ifdef PLATO_X86
__attribute__((target("avx2,fma"))) void StripSumSqAvx2(const float* b, int64_t dim,
                                                        float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int64_t f = 0; f < dim; ++f) {
    const __m256 b0 = _mm256_loadu_ps(b + f * kCols), b1 = _mm256_loadu_ps(b + f * kCols + 8);
    s0 = _mm256_fmadd_ps(b0, b0, s0), s1 = _mm256_fmadd_ps(b1, b1, s1);
  }
  _mm256_storeu_ps(out, s0);
  _mm256_storeu_ps(out + 8, s1);
}

// Pack for a whole strip (kCols rows): 8 × 8 blocks transposed in registers.
__attribute__((target("avx2,fma"))) void PackStripAvx2(const float* x, int64_t r0,
                                                       int64_t dim, float* out) {
  const int64_t whole = dim / 8 * 8;
  for (int64_t half = 0; half < kCols; half += 8) {
    const float* src = x + (r0 + half) * dim;
    for (int64_t f = 0; f < whole; f += 8) {
      __m256 r[8], t[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + j * dim + f);
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]), t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      }
      for (int j = 0; j < 8; j += 4) {
        r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
      }
      // Now r[j] (j < 4) holds feature f + j of rows 0-3 in its low 128 bits and feature
      // f + j + 4 of rows 0-3 in its high 128 bits; r[j + 4] the same for rows 4-7.
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(out + (f + j) * kCols + half,
                         _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
        _mm256_storeu_ps(out + (f + j + 4) * kCols + half,
                         _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
      }
    }
    for (int64_t f = whole; f < dim; ++f) {
      for (int64_t j = 0; j < 8; ++j) out[f * kCols + half + j] = src[j * dim + f];
    }
  }
}

// The AVX2 micro-tile: 12 accumulators, 8 lanes each; the same chains as the portable one.
// (Named registers, not an array: GCC keeps an array of vectors in memory.)
__attribute__((target("avx2,fma"))) void MicroTileAvx2(const float* a, const float* b,
                                                       int64_t depth, float* acc, bool fresh) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (fresh) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  } else {
    c00 = _mm256_load_ps(acc + 0 * kCols), c01 = _mm256_load_ps(acc + 0 * kCols + 8);
    c10 = _mm256_load_ps(acc + 1 * kCols), c11 = _mm256_load_ps(acc + 1 * kCols + 8);
    c20 = _mm256_load_ps(acc + 2 * kCols), c21 = _mm256_load_ps(acc + 2 * kCols + 8);
    c30 = _mm256_load_ps(acc + 3 * kCols), c31 = _mm256_load_ps(acc + 3 * kCols + 8);
    c40 = _mm256_load_ps(acc + 4 * kCols), c41 = _mm256_load_ps(acc + 4 * kCols + 8);
    c50 = _mm256_load_ps(acc + 5 * kCols), c51 = _mm256_load_ps(acc + 5 * kCols + 8);
  }
#pragma GCC unroll 4
  for (int64_t f = 0; f < depth; ++f) {
    const __m256 b0 = _mm256_load_ps(b + f * kCols), b1 = _mm256_load_ps(b + f * kCols + 8);
    const float* af = a + f * kRows;
    __m256 x = _mm256_broadcast_ss(af + 0);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(af + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(af + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(af + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(af + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(af + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_store_ps(acc + 0 * kCols, c00), _mm256_store_ps(acc + 0 * kCols + 8, c01);
  _mm256_store_ps(acc + 1 * kCols, c10), _mm256_store_ps(acc + 1 * kCols + 8, c11);
  _mm256_store_ps(acc + 2 * kCols, c20), _mm256_store_ps(acc + 2 * kCols + 8, c21);
  _mm256_store_ps(acc + 3 * kCols, c30), _mm256_store_ps(acc + 3 * kCols + 8, c31);
  _mm256_store_ps(acc + 4 * kCols, c40), _mm256_store_ps(acc + 4 * kCols + 8, c41);
  _mm256_store_ps(acc + 5 * kCols, c50), _mm256_store_ps(acc + 5 * kCols + 8, c51);
}

// The AVX-512 micro-tile: 6 queries × two strips (32 gallery rows), 12 accumulators of 16
// lanes; each lane the same chain as the AVX2 and portable micro-tiles (the strips' layouts
// and accumulators are theirs: a strip's finish is unchanged).
__attribute__((target("avx512f,avx2,fma"))) void MicroTilePairAvx512(
    const float* a, const float* b0, const float* b1, int64_t depth, float* acc0, float* acc1,
    bool fresh) {
  __m512 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (fresh) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm512_setzero_ps();
  } else {
    c00 = _mm512_load_ps(acc0 + 0 * kCols), c01 = _mm512_load_ps(acc1 + 0 * kCols);
    c10 = _mm512_load_ps(acc0 + 1 * kCols), c11 = _mm512_load_ps(acc1 + 1 * kCols);
    c20 = _mm512_load_ps(acc0 + 2 * kCols), c21 = _mm512_load_ps(acc1 + 2 * kCols);
    c30 = _mm512_load_ps(acc0 + 3 * kCols), c31 = _mm512_load_ps(acc1 + 3 * kCols);
    c40 = _mm512_load_ps(acc0 + 4 * kCols), c41 = _mm512_load_ps(acc1 + 4 * kCols);
    c50 = _mm512_load_ps(acc0 + 5 * kCols), c51 = _mm512_load_ps(acc1 + 5 * kCols);
  }
#pragma GCC unroll 4
  for (int64_t f = 0; f < depth; ++f) {
    const __m512 x0 = _mm512_load_ps(b0 + f * kCols), x1 = _mm512_load_ps(b1 + f * kCols);
    const float* af = a + f * kRows;
    __m512 q = _mm512_set1_ps(af[0]);
    c00 = _mm512_fmadd_ps(q, x0, c00), c01 = _mm512_fmadd_ps(q, x1, c01);
    q = _mm512_set1_ps(af[1]);
    c10 = _mm512_fmadd_ps(q, x0, c10), c11 = _mm512_fmadd_ps(q, x1, c11);
    q = _mm512_set1_ps(af[2]);
    c20 = _mm512_fmadd_ps(q, x0, c20), c21 = _mm512_fmadd_ps(q, x1, c21);
    q = _mm512_set1_ps(af[3]);
    c30 = _mm512_fmadd_ps(q, x0, c30), c31 = _mm512_fmadd_ps(q, x1, c31);
    q = _mm512_set1_ps(af[4]);
    c40 = _mm512_fmadd_ps(q, x0, c40), c41 = _mm512_fmadd_ps(q, x1, c41);
    q = _mm512_set1_ps(af[5]);
    c50 = _mm512_fmadd_ps(q, x0, c50), c51 = _mm512_fmadd_ps(q, x1, c51);
  }
  _mm512_store_ps(acc0 + 0 * kCols, c00), _mm512_store_ps(acc1 + 0 * kCols, c01);
  _mm512_store_ps(acc0 + 1 * kCols, c10), _mm512_store_ps(acc1 + 1 * kCols, c11);
  _mm512_store_ps(acc0 + 2 * kCols, c20), _mm512_store_ps(acc1 + 2 * kCols, c21);
  _mm512_store_ps(acc0 + 3 * kCols, c30), _mm512_store_ps(acc1 + 3 * kCols, c31);
  _mm512_store_ps(acc0 + 4 * kCols, c40), _mm512_store_ps(acc1 + 4 * kCols, c41);
  _mm512_store_ps(acc0 + 5 * kCols, c50), _mm512_store_ps(acc1 + 5 * kCols, c51);
}

// Offers a finished micro-tile's scores to queries q0..q0 + rows. Lanes above a query's
// threshold value are appended 8 at a time; the rare lanes equal to it (decided by id), and
// rows near a full pool or in a partial strip, go through the scalar Offer.
__attribute__((target("avx2,fma"))) void FinishTileAvx2(const Problem& p, const float* acc,
                                                        const float* scale, int64_t q0,
                                                        int64_t rows, int64_t col, int64_t n,
                                                        Scratch& scratch) {
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  const uint32_t valid = (1u << n) - 1;
  __m256i id0 = _mm256_set1_epi32(-1), id1 = id0;
  if (n == kCols) {
    id0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.gallery_ids + col));
    id1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.gallery_ids + col + 8));
  }
  const __m256i zero_i = _mm256_setzero_si256();
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = q0 + r;
    // Only lanes whose finished score reaches the threshold are offered (NaN never does).
    const __m256 root = _mm256_set1_ps(p.threshold_value[q]);
    const __m256 lo = _mm256_load_ps(acc + r * kCols), hi = _mm256_load_ps(acc + r * kCols + 8);
    const __m256 v0 = _mm256_mul_ps(lo, s0), v1 = _mm256_mul_ps(hi, s1);
    const uint32_t reach = valid & (_mm256_movemask_ps(_mm256_cmp_ps(v0, root, _CMP_GE_OQ)) |
                                    _mm256_movemask_ps(_mm256_cmp_ps(v1, root, _CMP_GE_OQ)) << 8);
    if (!reach) continue;
    if (n < kCols || p.count[q] + kCols > p.capacity) {
      Offer(p, q, col, acc + r * kCols, scale, reach, scratch);
      continue;
    }
    // Above the threshold's value, a padding id (< 0) or the query's own: never selected.
    const __m256i own = _mm256_set1_epi32(p.query_ids[q]);
    const __m256 bad0 = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_cmpgt_epi32(zero_i, id0), _mm256_cmpeq_epi32(id0, own)));
    const __m256 bad1 = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_cmpgt_epi32(zero_i, id1), _mm256_cmpeq_epi32(id1, own)));
    const __m256 above0 = _mm256_cmp_ps(v0, root, _CMP_GT_OQ);
    const __m256 above1 = _mm256_cmp_ps(v1, root, _CMP_GT_OQ);
    const int64_t base = q * p.capacity;
    int64_t count = p.count[q];
    // + 0.0f: -0.0 is kept as +0.0.
    count += AppendLanes(p.values + base + count, p.ids + base + count, _mm256_add_ps(v0, zero),
                         id0, _mm256_andnot_ps(bad0, above0));
    count += AppendLanes(p.values + base + count, p.ids + base + count, _mm256_add_ps(v1, zero),
                         id1, _mm256_andnot_ps(bad1, above1));
    p.count[q] = static_cast<int32_t>(count);
    if (count == p.capacity) Compact(p, q, scratch);
    const uint32_t ties = reach & ~static_cast<uint32_t>(
        _mm256_movemask_ps(above0) | _mm256_movemask_ps(above1) << 8);
    if (ties) Offer(p, q, col, acc + r * kCols, scale, ties, scratch);
  }
}
#endif

bool HasAvx2() {
#ifdef PLATO_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool HasAvx512() {
#ifdef PLATO_X86
  return HasAvx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// A float buffer whose data starts on a cache line (so a packed strip's 16 floats of one
// feature are one line, not two).
class LineAligned {
 public:
  explicit LineAligned(size_t n) : storage_(n + 16) {
    data_ = storage_.data() + (-reinterpret_cast<uintptr_t>(storage_.data()) / 4 & 15);
  }
  LineAligned(const LineAligned&) = delete;  // a copy's data_ would point into the original
  LineAligned& operator=(const LineAligned&) = delete;
  float* data() { return data_; }

 private:
  std::vector<float> storage_;
  float* data_;
};

// One thread's share: queries [q_begin, q_end) against the whole tile. The first thread
// (`first`) also writes the rows' squared norms.
//
// Loop order (as BLIS's): a block of gallery rows is packed once (L2); for a group of query
// panels (L2) and a chunk of `depth_chunk` features, each strip's chunk stays in L1 while
// the group's panels stream past it. Partial sums wait in `acc` between chunks: storing
// and reloading an f32 keeps every score the same FMA chain.
void FoldQueries(const Problem& p, const float* queries, int64_t q_begin, int64_t q_end,
                 int64_t block_cols, int64_t group_panels, int64_t depth_chunk, bool first) {
  const int64_t dim = p.dim;
  const bool avx2 = p.avx2;
  const int64_t panels = (q_end - q_begin + kRows - 1) / kRows;
  LineAligned a(static_cast<size_t>(panels * kRows * dim));
  for (int64_t i = 0; i < panels; ++i) {
    const int64_t r0 = q_begin + i * kRows;
    Pack(queries, r0, std::min(kRows, q_end - r0), kRows, dim, a.data() + i * kRows * dim);
  }
  Scratch scratch;
  group_panels = std::min(group_panels, std::max<int64_t>(panels, 1));
  const int64_t block = (std::min(block_cols, p.num_t) + kCols - 1) / kCols * kCols;
  const int64_t block_strips = block / kCols;
  LineAligned b(static_cast<size_t>(block * dim));
  std::vector<float> sumsq(block), scale(block, 1.0f);
  const bool norms = first || p.normalize;  // the others need no norms without normalize
  constexpr int64_t kTile = kRows * kCols;
  // Micro-tile accumulators, one per (panel of the group, strip).
  LineAligned acc_buffer(static_cast<size_t>(group_panels * block_strips * kTile));
  float* acc = acc_buffer.data();
  for (int64_t t0 = 0; t0 < p.num_t; t0 += block) {
    const int64_t cols = std::min(block, p.num_t - t0);
    const int64_t strips = (cols + kCols - 1) / kCols;
    for (int64_t s = 0; s < strips; ++s) {
      float* strip = b.data() + s * kCols * dim;
#ifdef PLATO_X86
      if (avx2) {
        if (cols - s * kCols >= kCols) {
          PackStripAvx2(p.rows, t0 + s * kCols, dim, strip);
        } else {
          Pack(p.rows, t0 + s * kCols, cols - s * kCols, kCols, dim, strip);
        }
        if (norms) StripSumSqAvx2(strip, dim, sumsq.data() + s * kCols);
        continue;
      }
#endif
      Pack(p.rows, t0 + s * kCols, std::min(kCols, cols - s * kCols), kCols, dim, strip);
      if (norms) StripSumSqPortable(strip, dim, sumsq.data() + s * kCols);
    }
    if (p.normalize) {
      for (int64_t j = 0; j < strips * kCols; ++j) {
        scale[j] = sumsq[j] > 0.0f ? 1.0f / std::sqrt(sumsq[j]) : 0.0f;
      }
    }
    if (first) std::memcpy(p.row_sumsq + t0, sumsq.data(), sizeof(float) * cols);
    for (int64_t g0 = 0; g0 < panels; g0 += group_panels) {
      const int64_t g1 = std::min(panels, g0 + group_panels);
      for (int64_t f0 = 0; f0 == 0 || f0 < dim; f0 += depth_chunk) {  // once when dim = 0
        const int64_t depth = std::min(depth_chunk, dim - f0);
        // AVX-512 takes the strips two at a time (an odd last one as AVX2 does).
        const int64_t step = p.avx512 ? 2 : 1;
        for (int64_t s = 0; s < strips; s += step) {
          const float* bp = b.data() + s * kCols * dim + f0 * kCols;
          for (int64_t i = g0; i < g1; ++i) {
            const float* ap = a.data() + i * kRows * dim + f0 * kRows;
            float* out = acc + ((i - g0) * block_strips + s) * kTile;
#ifdef PLATO_X86
            if (p.avx512 && s + 1 < strips) {
              MicroTilePairAvx512(ap, bp, bp + kCols * dim, depth, out, out + kTile, f0 == 0);
              continue;
            }
            if (avx2) {
              MicroTileAvx2(ap, bp, depth, out, f0 == 0);
              continue;
            }
#endif
            MicroTilePortable(ap, bp, depth, out, f0 == 0);
          }
        }
      }
      for (int64_t i = g0; i < g1; ++i) {
        const int64_t q0 = q_begin + i * kRows, rows = std::min(kRows, q_end - q0);
        for (int64_t s = 0; s < strips; ++s) {
          const int64_t col = t0 + s * kCols, n = std::min(kCols, p.num_t - col);
          const float* out = acc + ((i - g0) * block_strips + s) * kTile;
          const float* sp = scale.data() + s * kCols;
#ifdef PLATO_X86
          if (avx2) {
            FinishTileAvx2(p, out, sp, q0, rows, col, n, scratch);
            continue;
          }
#endif
          FinishTilePortable(p, out, sp, q0, rows, col, n, scratch);
        }
      }
    }
  }
}

ffi::Error TileTopKImpl(ffi::Buffer<ffi::F32> values_in, ffi::Buffer<ffi::S32> ids_in,
                        ffi::Buffer<ffi::S32> count_in, ffi::Buffer<ffi::F32> threshold_value_in,
                        ffi::Buffer<ffi::S32> threshold_id_in, ffi::Buffer<ffi::F32> queries,
                        ffi::Buffer<ffi::S32> query_ids, ffi::Buffer<ffi::F32> rows,
                        ffi::Buffer<ffi::S32> row_offset, ffi::Buffer<ffi::S32> tile_ids,
                        ffi::ResultBuffer<ffi::F32> values_out,
                        ffi::ResultBuffer<ffi::S32> ids_out,
                        ffi::ResultBuffer<ffi::S32> count_out,
                        ffi::ResultBuffer<ffi::F32> threshold_value_out,
                        ffi::ResultBuffer<ffi::S32> threshold_id_out,
                        ffi::ResultBuffer<ffi::F32> row_sumsq, int64_t k, int64_t block_cols,
                        int64_t group_panels, int64_t depth_chunk, int64_t threads,
                        bool normalize, int64_t isa) {
  const auto qd = queries.dimensions(), sd = values_in.dimensions();
  const int64_t num_q = qd[0], dim = qd[1], num_t = tile_ids.element_count(),
                capacity = sd[1];
  if (sd[0] != num_q || k < 1 || capacity <= k || row_offset.element_count() != 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "plato_tile_topk: bad shapes");
  }
  constexpr int64_t kMaxBlocking = 1 << 20;
  if (block_cols < 1 || group_panels < 1 || depth_chunk < 1 || threads < 1 ||
      std::max({block_cols, group_panels, depth_chunk, threads}) > kMaxBlocking) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "plato_tile_topk: block_cols, group_panels, depth_chunk and threads must "
                      "be in [1, 2^20]");
  }
  // The pools must be this kernel's own state (empty_pools, or a previous call's output).
  if (isa < kPortable || isa > kAvx512 || (isa >= kAvx2 && !HasAvx2()) ||
      (isa == kAvx512 && !HasAvx512())) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "plato_tile_topk: isa must be 0 (portable), 1 (AVX2) or 2 (AVX-512) and "
                      "one this CPU has");
  }
  const int32_t* counts = count_in.typed_data();
  for (int64_t q = 0; q < num_q; ++q) {
    if (counts[q] < 0 || counts[q] >= capacity) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "plato_tile_topk: a pool count is outside [0, capacity)");
    }
  }
  const int64_t offset = row_offset.typed_data()[0];
  if (offset < 0 || offset + num_t * dim > static_cast<int64_t>(rows.element_count())) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "plato_tile_topk: the rows (offset + tile rows x dim) overrun their buffer");
  }
  // Padding (id < 0) fills a tile's last rows: a partial tile (a prefix's or band's last)
  // costs only its real rows. Padding rows' norms read 0.
  int64_t real_t = num_t;
  while (real_t > 0 && tile_ids.typed_data()[real_t - 1] < 0) --real_t;
  std::fill(row_sumsq->typed_data() + real_t, row_sumsq->typed_data() + num_t, 0.0f);
  Problem p{rows.typed_data() + offset, tile_ids.typed_data(), query_ids.typed_data(),
            values_out->typed_data(), ids_out->typed_data(), count_out->typed_data(),
            threshold_value_out->typed_data(), threshold_id_out->typed_data(),
            row_sumsq->typed_data(), k, capacity, real_t, dim, normalize, isa >= kAvx2,
            isa == kAvx512};
  // In place when XLA aliased the state (it does: input_output_aliases); else copy it over.
  auto keep = [](void* out, const void* in, size_t bytes) {
    if (out != in) std::memcpy(out, in, bytes);
  };
  keep(p.values, values_in.typed_data(), sizeof(float) * num_q * capacity);
  keep(p.ids, ids_in.typed_data(), sizeof(int32_t) * num_q * capacity);
  keep(p.count, count_in.typed_data(), sizeof(int32_t) * num_q);
  keep(p.threshold_value, threshold_value_in.typed_data(), sizeof(float) * num_q);
  keep(p.threshold_id, threshold_id_in.typed_data(), sizeof(int32_t) * num_q);
  if (real_t == 0) return ffi::Error::Success();
  // Whole micro-tiles of queries per thread; with no queries, one thread still writes the
  // norms.
  const int64_t panels = (num_q + kRows - 1) / kRows;
  const int64_t workers = std::max<int64_t>(1, std::min(threads, panels));
  auto share = [&](int64_t w) { return std::min(num_q, panels * w / workers * kRows); };
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) {
    pool.emplace_back(FoldQueries, std::cref(p), queries.typed_data(), share(w), share(w + 1),
                      block_cols, group_panels, depth_chunk, false);
  }
  FoldQueries(p, queries.typed_data(), share(0), share(1), block_cols, group_panels, depth_chunk,
              true);
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PlatoTileTopK, TileTopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pool values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pool ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pool counts
                                  .Arg<ffi::Buffer<ffi::F32>>()   // threshold values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // threshold ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // queries
                                  .Arg<ffi::Buffer<ffi::S32>>()   // query ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rows (flat)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // offset of row 0 in them
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tile ids
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // row squared norms
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("block_cols")
                                  .Attr<int64_t>("group_panels")
                                  .Attr<int64_t>("depth_chunk")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("normalize")
                                  .Attr<int64_t>("isa"));
