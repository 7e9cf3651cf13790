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
// window of the memory around them, which XLA takes without a copy. Rows may be f32, bf16
// or f16; narrow ones are widened (exactly) a strip at a time while packing.
//
// bf16 products (bf16_inputs: queries and rows rounded to bf16 to nearest even) run on AMX
// tiles where the CPU has them (FoldQueriesAmx), else through the same FMA micro-tiles.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PLATO_X86 1
// Compilers whose intrinsics know AMX's tile instructions.
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define PLATO_AMX 1
#endif
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

// How the tile's rows are stored (the `rows` buffer's element type).
enum RowType : int64_t { kF32 = 0, kBf16 = 1, kF16 = 2 };

struct Problem {
  const void* rows;            // row r of the tile at rows + r * dim, of `row_type`
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
  int64_t row_type;
  bool bf16_inputs;            // the products take queries and rows rounded to bf16
  bool amx;                    // bf16 products on AMX tiles (FoldQueriesAmx); f32 ones
                               // then take the AVX-512 path
};

// Instruction sets, as the `isa` attribute names them.
enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

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

// Narrow values, one at a time, as numpy (ml_dtypes) converts them: bf16 and f16 widen
// exactly; f32 rounds to bf16 to nearest, ties to even (a NaN stays a NaN).
inline float Bf16ToF32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(u >> 16 | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31, exponent = h >> 10 & 31,
                 mantissa = h & 1023;
  uint32_t u;
  if (exponent == 31) {
    u = sign | 0x7f800000u | mantissa << 13;
  } else if (exponent) {
    u = sign | (exponent + 112) << 23 | mantissa << 13;
  } else {  // zero or subnormal: mantissa · 2^-24, exact in f32
    const float f = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float RowValue(const Problem& p, int64_t i) {
  switch (p.row_type) {
    case kBf16: return Bf16ToF32(static_cast<const uint16_t*>(p.rows)[i]);
    case kF16: return F16ToF32(static_cast<const uint16_t*>(p.rows)[i]);
    default: return static_cast<const float*>(p.rows)[i];
  }
}

inline float RoundedToBf16(float f) { return Bf16ToF32(F32ToBf16(f)); }

// Element i of the rows as the products take it.
inline float TakenValue(const Problem& p, int64_t i) {
  return p.bf16_inputs ? RoundedToBf16(RowValue(p, i)) : RowValue(p, i);
}

#ifdef PLATO_X86
// Eight values at once, as the scalar functions above.
__attribute__((target("avx2,fma,f16c"))) __m256 LoadAsF32Avx2(const Problem& p, int64_t i) {
  if (p.row_type == kF32) return _mm256_loadu_ps(static_cast<const float*>(p.rows) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
      static_cast<const uint16_t*>(p.rows) + i));
  return p.row_type == kBf16
             ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
             : _mm256_cvtph_ps(h);
}

__attribute__((target("avx2,fma"))) __m256 RoundedToBf16Avx2(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  const __m256i nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256i top = _mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan), is_nan));
  return _mm256_castsi256_ps(_mm256_and_si256(top, _mm256_set1_epi32(-65536)));
}

__attribute__((target("avx2,fma,f16c"))) void RowsAsF32Avx2(const Problem& p, int64_t begin,
                                                            int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = LoadAsF32Avx2(p, begin + j);
    _mm256_storeu_ps(out + j, p.bf16_inputs ? RoundedToBf16Avx2(x) : x);
  }
  for (; j < n; ++j) {
    out[j] = TakenValue(p, begin + j);
  }
}
#endif

// Rows [r0, r0 + count) of the tile as f32 values the products take (rounded to bf16 for
// bf16 inputs), row-major: the micro-tiles' packing then reads them as f32 rows.
void RowsAsF32(const Problem& p, int64_t r0, int64_t count, float* out) {
  const int64_t begin = r0 * p.dim, n = count * p.dim;
#ifdef PLATO_X86
  if (p.avx2) return RowsAsF32Avx2(p, begin, n, out);
#endif
  for (int64_t j = 0; j < n; ++j) {
    out[j] = TakenValue(p, begin + j);
  }
}

// The products read the rows in place when they are f32 and taken as they are.
bool RowsReadInPlace(const Problem& p) { return p.row_type == kF32 && !p.bf16_inputs; }

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
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
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

// AMX-BF16 in the CPU (CPUID leaf 7: EDX bits 22 and 24), and the kernel's permission to use
// its tile state (Linux grants it per process, on request: arch_prctl(ARCH_REQ_XCOMP_PERM)).
bool HasAmx() {
#ifdef PLATO_AMX
  unsigned eax, ebx, ecx, edx;
  if (!HasAvx512() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx >> 22 & 1) || !(edx >> 24 & 1)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
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

// --- AMX: bf16 products on tiles ---------------------------------------------------------
//
// TDPBF16PS multiplies a 16 × 32 bf16 tile A by a 32 × 16 one B (held as 16 rows of 16 bf16
// pairs: "VNNI" order) into a 16 × 16 f32 tile C. Products of bf16 values are exact in f32;
// only the additions round — in the hardware's order, not the FMA path's — and the engine's
// certificate bounds any order (so the AMX path's scores may differ from the FMA path's by
// a few ulps, but the neighbours do not). Queries are A (16 a panel), gallery rows B (16 a
// strip); a 2 × 2 block of C tiles (32 queries × 32 rows) stays in the tile registers over
// all features, then goes to memory (4 KiB, L1) for the same finish as the FMA micro-tiles.
#ifdef PLATO_AMX
constexpr int64_t kAmxRows = 16;    // queries per A tile, gallery rows per B tile
constexpr int64_t kAmxDepth = 32;   // features per tile step
constexpr int64_t kAmxTile = 512;   // bf16 elements of an A or B tile (1 KiB)

// Rows [r0, r0 + count) as bf16 rows of `stride` elements (zero beyond dim, and rows count..
// kAmxRows all zero): the values the products take.
__attribute__((target("avx512f,avx2,fma,f16c"))) void RowsAsBf16(const Problem& p, int64_t r0,
                                                                 int64_t count, int64_t stride,
                                                                 uint16_t* out) {
  const int64_t dim = p.dim;
  for (int64_t r = 0; r < count; ++r) {
    uint16_t* o = out + r * stride;
    const int64_t begin = (r0 + r) * dim;
    if (p.row_type == kBf16) {
      std::memcpy(o, static_cast<const uint16_t*>(p.rows) + begin, sizeof(uint16_t) * dim);
    } else {
      int64_t j = 0;
      for (; j + 8 <= dim; j += 8) {  // rounded as F32ToBf16, then the top halves packed
        const __m256i top = _mm256_srli_epi32(
            _mm256_castps_si256(RoundedToBf16Avx2(LoadAsF32Avx2(p, begin + j))), 16);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j),
                         _mm256_castsi256_si128(_mm256_permute4x64_epi64(
                             _mm256_packus_epi32(top, top), 0x08)));
      }
      for (; j < dim; ++j) o[j] = F32ToBf16(RowValue(p, begin + j));
    }
    std::fill(o + dim, o + stride, uint16_t{0});
  }
  std::fill(out + count * stride, out + kAmxRows * stride, uint16_t{0});
}

// A strip's bf16 rows (row-major, `stride`) as B tiles, one per chunk of 32 features: word
// [kk][n] of chunk c is row n's features 32c + 2kk and 32c + 2kk + 1 — a 16 × 16 transpose
// of 32-bit words.
__attribute__((target("avx512f"))) void PackStripVnni(const uint16_t* rows, int64_t stride,
                                                      int64_t chunks, uint16_t* out) {
  const int64_t words = stride / 2;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(rows);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                            5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(words)));
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t kk = 0; kk < 16; ++kk) {
      _mm512_store_si512(o + (c * 16 + kk) * 16,
                         _mm512_i32gather_epi32(lanes, w + c * 16 + kk, 4));
    }
  }
}

// Squared norms of a packed strip's 16 rows from its B tiles: one FMA chain per row in
// feature order, as StripSumSqAvx2 (zero features add nothing), so the bits are the FMA
// path's.
__attribute__((target("avx512f"))) void StripSumSqVnni(const uint16_t* b, int64_t chunks,
                                                       float* out) {
  __m512 s = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(-65536);
  for (int64_t j = 0; j < chunks * 16; ++j) {
    const __m512i w = _mm512_load_si512(b + j * 32);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, high));
    s = _mm512_fmadd_ps(even, even, s);
    s = _mm512_fmadd_ps(odd, odd, s);
  }
  _mm512_storeu_ps(out, s);
}

// Queries [q0, q0 + count) (already bf16 values) as A tiles: panel i's chunk c at
// out + (i · chunks + c) · kAmxTile, a row of 32 features per query; zero elsewhere.
void PackQueriesAmx(const float* queries, int64_t q0, int64_t count, int64_t dim,
                    int64_t chunks, uint16_t* out, int64_t panels) {
  std::fill(out, out + panels * chunks * kAmxTile, uint16_t{0});
  for (int64_t q = 0; q < count; ++q) {
    const int64_t panel = q / kAmxRows, r = q % kAmxRows;
    for (int64_t f = 0; f < dim; ++f) {
      out[(panel * chunks + f / kAmxDepth) * kAmxTile + r * kAmxDepth + f % kAmxDepth] =
          F32ToBf16(queries[(q0 + q) * dim + f]);
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C tiles 0-3 = (A0, A1) × (B0, B1) over `chunks` steps, stored at c (each 16 × 16 f32).
__attribute__((target("amx-tile,amx-bf16"))) void TileBlockAmx(const uint16_t* a0,
                                                               const uint16_t* a1,
                                                               const uint16_t* b0,
                                                               const uint16_t* b1,
                                                               int64_t chunks, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t j = 0; j < chunks; ++j) {
    _tile_loadd(4, a0 + j * kAmxTile, 64);
    _tile_loadd(6, b0 + j * kAmxTile, 64);
    _tile_loadd(5, a1 + j * kAmxTile, 64);
    _tile_loadd(7, b1 + j * kAmxTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
}

__attribute__((target("amx-tile"))) void LoadTileConfig() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  // Not _tile_loadconfig: GCC's asm for it names only the config's first 8 bytes as read,
  // so the stores of the rest can be dropped (seen with GCC 12: a random config, a #GP).
  asm volatile("ldtilecfg %0" : : "m"(config));
}

__attribute__((target("amx-tile"))) void ReleaseTiles() { _tile_release(); }

// FoldQueries on AMX tiles (queries already bf16 values). A gallery block is packed once
// per thread into B tiles; for each pair of strips, every pair of query panels passes.
void FoldQueriesAmx(const Problem& p, const float* queries, int64_t q_begin, int64_t q_end,
                    int64_t block_cols, bool first) {
  const int64_t dim = p.dim, chunks = std::max<int64_t>(1, (dim + kAmxDepth - 1) / kAmxDepth);
  const int64_t stride = chunks * kAmxDepth, strip_elems = chunks * kAmxTile;
  int64_t panels = (q_end - q_begin + kAmxRows - 1) / kAmxRows;
  panels += panels % 2;
  LineAligned a(static_cast<size_t>(panels * strip_elems / 2));
  uint16_t* a16 = reinterpret_cast<uint16_t*>(a.data());
  PackQueriesAmx(queries, q_begin, q_end - q_begin, dim, chunks, a16, panels);
  const int64_t pair = 2 * kAmxRows;
  const int64_t block = (std::min(block_cols, p.num_t) + pair - 1) / pair * pair;
  LineAligned b(static_cast<size_t>(block / kAmxRows * strip_elems / 2));
  LineAligned rows(static_cast<size_t>(kAmxRows * stride / 2));
  uint16_t* b16 = reinterpret_cast<uint16_t*>(b.data());
  uint16_t* rows16 = reinterpret_cast<uint16_t*>(rows.data());
  std::vector<float> sumsq(block), scale(block, 1.0f);
  LineAligned acc(4 * kAmxRows * kAmxRows);
  const bool norms = first || p.normalize;
  Scratch scratch;
  LoadTileConfig();
  for (int64_t t0 = 0; t0 < p.num_t; t0 += block) {
    const int64_t cols = std::min(block, p.num_t - t0);
    const int64_t strips = (cols + pair - 1) / pair * 2;
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t count = std::max<int64_t>(0, std::min(kAmxRows, cols - s * kAmxRows));
      RowsAsBf16(p, t0 + s * kAmxRows, count, stride, rows16);
      PackStripVnni(rows16, stride, chunks, b16 + s * strip_elems);
      if (norms) StripSumSqVnni(b16 + s * strip_elems, chunks, sumsq.data() + s * kAmxRows);
    }
    if (p.normalize) {
      for (int64_t j = 0; j < cols; ++j) {
        scale[j] = sumsq[j] > 0.0f ? 1.0f / std::sqrt(sumsq[j]) : 0.0f;
      }
    }
    if (first) std::memcpy(p.row_sumsq + t0, sumsq.data(), sizeof(float) * cols);
    for (int64_t s = 0; s < strips; s += 2) {
      const uint16_t* b0 = b16 + s * strip_elems;
      for (int64_t i = 0; i < panels; i += 2) {
        TileBlockAmx(a16 + i * strip_elems, a16 + (i + 1) * strip_elems, b0, b0 + strip_elems,
                     chunks, acc.data());
        for (int64_t di = 0; di < 2; ++di) {
          const int64_t q0 = q_begin + (i + di) * kAmxRows;
          const int64_t rows_here = std::min(kAmxRows, q_end - q0);
          for (int64_t dj = 0; dj < 2 && rows_here > 0; ++dj) {
            const int64_t col = t0 + (s + dj) * kAmxRows;
            const int64_t n = std::min(kAmxRows, p.num_t - col);
            if (n <= 0) continue;
            FinishTileAvx2(p, acc.data() + (2 * di + dj) * kAmxRows * kAmxRows,
                           scale.data() + (s + dj) * kAmxRows, q0, rows_here, col, n, scratch);
          }
        }
      }
    }
  }
  ReleaseTiles();
}
#endif

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
  std::vector<float> converted(RowsReadInPlace(p) ? 0 : kCols * dim);  // one strip's rows
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
      const int64_t count = std::min(kCols, cols - s * kCols);
      const float* src = static_cast<const float*>(p.rows);
      int64_t r0 = t0 + s * kCols;
      if (!RowsReadInPlace(p)) {
        RowsAsF32(p, r0, count, converted.data());
        src = converted.data(), r0 = 0;
      }
#ifdef PLATO_X86
      if (avx2) {
        if (count == kCols) {
          PackStripAvx2(src, r0, dim, strip);
        } else {
          Pack(src, r0, count, kCols, dim, strip);
        }
        if (norms) StripSumSqAvx2(strip, dim, sumsq.data() + s * kCols);
        continue;
      }
#endif
      Pack(src, r0, count, kCols, dim, strip);
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
                        ffi::Buffer<ffi::S32> query_ids, ffi::AnyBuffer rows,
                        ffi::Buffer<ffi::S32> row_offset, ffi::Buffer<ffi::S32> tile_ids,
                        ffi::ResultBuffer<ffi::F32> values_out,
                        ffi::ResultBuffer<ffi::S32> ids_out,
                        ffi::ResultBuffer<ffi::S32> count_out,
                        ffi::ResultBuffer<ffi::F32> threshold_value_out,
                        ffi::ResultBuffer<ffi::S32> threshold_id_out,
                        ffi::ResultBuffer<ffi::F32> row_sumsq, int64_t k, int64_t block_cols,
                        int64_t group_panels, int64_t depth_chunk, int64_t threads,
                        bool normalize, bool bf16_inputs, int64_t isa) {
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
  if (isa < kPortable || isa > kAmx || (isa >= kAvx2 && !HasAvx2()) ||
      (isa >= kAvx512 && !HasAvx512()) || (isa == kAmx && !HasAmx())) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "plato_tile_topk: isa must be 0 (portable), 1 (AVX2), 2 (AVX-512) or 3 "
                      "(AMX-BF16) and one this CPU has");
  }
  int64_t row_type;
  switch (rows.element_type()) {
    case ffi::DataType::F32: row_type = kF32; break;
    case ffi::DataType::BF16: row_type = kBf16; break;
    case ffi::DataType::F16: row_type = kF16; break;
    default:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "plato_tile_topk: rows must be f32, bf16 or f16");
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
  const size_t item = row_type == kF32 ? 4 : 2;
  Problem p{static_cast<const char*>(rows.untyped_data()) + offset * item,
            tile_ids.typed_data(), query_ids.typed_data(),
            values_out->typed_data(), ids_out->typed_data(), count_out->typed_data(),
            threshold_value_out->typed_data(), threshold_id_out->typed_data(),
            row_sumsq->typed_data(), k, capacity, real_t, dim, normalize, isa >= kAvx2,
            isa >= kAvx512, row_type, bf16_inputs, isa == kAmx && bf16_inputs};
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
  const int64_t unit = p.amx ? 32 : kRows;  // queries per AMX block (two A tiles), micro-tile
  const int64_t panels = (num_q + unit - 1) / unit;
  const int64_t workers = std::max<int64_t>(1, std::min(threads, panels));
  auto share = [&](int64_t w) { return std::min(num_q, panels * w / workers * unit); };
  // bf16 inputs: the queries rounded once, for every thread.
  std::vector<float> rounded(bf16_inputs ? num_q * dim : 0);
  for (size_t j = 0; j < rounded.size(); ++j) rounded[j] = RoundedToBf16(queries.typed_data()[j]);
  const float* q = bf16_inputs ? rounded.data() : queries.typed_data();
  auto fold = [&](int64_t w) {
#ifdef PLATO_AMX
    if (p.amx) return FoldQueriesAmx(p, q, share(w), share(w + 1), block_cols, w == 0);
#endif
    FoldQueries(p, q, share(w), share(w + 1), block_cols, group_panels, depth_chunk, w == 0);
  };
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(fold, w);
  fold(0);
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
                                  .Arg<ffi::AnyBuffer>()          // rows (flat): f32, bf16, f16
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
                                  .Attr<bool>("bf16_inputs")
                                  .Attr<int64_t>("isa"));
