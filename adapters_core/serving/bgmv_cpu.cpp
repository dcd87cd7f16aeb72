// Batched LoRA product on x86-64 CPUs with AVX2, FMA and F16C, one adapter per row, for every token t:
//
//     out[i, t, :] += (x[i, t, :] @ A[w(i)][:, :r(i)]) @ B[w(i)][:r(i), :]      w(i) = idx[i]
//
// where r(i) = min(width, ranks[w(i)]) when the call gives each slot's rank (a row reads only its own
// adapter's rank columns, and a row whose slot has no adapter on the layer reads nothing), else width.
//
// x, out and every product and sum are float32; the weights A and B are float32 (af_bgmv_f32) or IEEE
// float16 (af_bgmv_f16w: half the memory and memory traffic), widened to float32 as they are loaded,
// so af_bgmv_f16w on a float16 bank adds exactly what af_bgmv_f32 adds on that bank widened to float32
// (the same float32 operations in the same order).
//
// Decode steps have one token per row; prefills have several, taken in blocks of 4 tokens (each
// weight loaded feeds the block's 4 tokens, and a row's weights stay in the core's caches while its
// blocks go through). The rows (or blocks) are split over the threads in contiguous ranges of about
// equal work, counted in rank columns.
//
// A row's weights are read once, in order (A row by row, then B), so a decode step costs about
// what streaming the batch's adapter weights through the caches costs. Built and loaded by
// adapters_core/serving/cpu_bgmv.py (g++ -O3 -mavx2 -mfma -mf16c -fopenmp); the threads are the OpenMP
// threads of the process (torch's own runtime: the library links libgomp by soname).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kMaxWidth = 1024;  // rank columns a call may multiply (h lives on the stack)

// Weights are float or Half (IEEE float16 bits); either is read as float32 values.
using Half = uint16_t;

// The last, partial vector of a row of weights: its first `lanes` (1..7) of 8. `mask`: those lanes set
// (float weights); `pairs`: the 32-bit lanes holding two of them, `odd`: the 16-bit lane of the last
// one (half weights).
struct Tail {
  __m256i mask;
  int lanes;
  __m128i pairs, odd;
};

inline Tail tail_of(int lanes) {
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), lanes,
          _mm_cmpgt_epi32(_mm_set1_epi32(lanes / 2), _mm_setr_epi32(0, 1, 2, 3)),
          _mm_cmpeq_epi16(_mm_set1_epi16(static_cast<int16_t>(lanes - 1)), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7))};
}

constexpr Tail kNoTail = {};  // for the blocks of whole vectors

// 8 weights from p, as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// The tail's lanes from p as float32, zeros in the others; reads nothing past the tail's lanes (a
// slot's last row may end the bank's allocation, and masked-off lanes are neither read nor fault).
// AVX2 has no 16-bit masked load: half weights are read in pairs by a 32-bit masked load, and an odd
// last one on its own, blended in. (Copying the lanes to a buffer on the stack instead costs a
// stalled store-to-load forward per row of A: the float16 kernel ran 1.5-2.2x slower than the float32
// one at ranks 4 and 12; this way it runs faster.)
inline __m256 load_tail(const float* p, Tail tail) { return _mm256_maskload_ps(p, tail.mask); }
inline __m256 load_tail(const Half* p, Tail tail) {
  __m128i v = _mm_maskload_epi32(reinterpret_cast<const int*>(p), tail.pairs);
  if (tail.lanes & 1) v = _mm_blendv_epi8(v, _mm_set1_epi16(static_cast<int16_t>(p[tail.lanes - 1])), tail.odd);
  return _mm256_cvtph_ps(v);
}

// A function compiled once and called, never inlined, cloned or specialised to a call site.
#if defined(__clang__)
#define AF_ONE_BODY __attribute__((noinline))
#else
#define AF_ONE_BODY __attribute__((noipa))
#endif

// out[0 : n] += h[0 : width] @ b[0 : width, 0 : n] (row stride sb), output by output: a row's last
// outputs, fewer than 8. The compiler vectorizes the sum over j in part (GCC: 4 products at a time,
// multiplied then added in order, the rest fused), so its roundings are the compiler's: the float16
// path runs this very code on its weights widened.
AF_ONE_BODY void expand_scalar(const float* h, const float* b, int64_t width, int64_t n, int64_t sb, float* out) {
  for (int64_t o = 0; o < n; ++o) {
    float s = out[o];
    for (int64_t j = 0; j < width; ++j) s += h[j] * b[j * sb + o];
    out[o] = s;
  }
}

// expand_scalar over float weights as they are, or over half weights widened into a copy (with a row
// stride of 8, or 1 where B's is 1: the compiler may have a version of the loop for unit strides).
inline void expand_last(const float* h, const float* b, int64_t width, int64_t n, int64_t sb, float* out) {
  expand_scalar(h, b, width, n, sb, out);
}
inline void expand_last(const float* h, const Half* b, int64_t width, int64_t n, int64_t sb, float* out) {
  alignas(32) float wide[kMaxWidth * 8];
  const int64_t sw = sb == 1 ? 1 : 8;
  for (int64_t j = 0; j < width; ++j)
    for (int64_t o = 0; o < n; ++o) wide[j * sw + o] = _cvtsh_ss(b[j * sb + o]);
  expand_scalar(h, wide, width, n, sw, out);
}

// h[0 : 8*NB] = x @ a[:, 0 : 8*NB] over `in` rows of a (row stride sa); with MASKED the last of
// the NB vectors reads only the tail's lanes (and writes zeros in the others).
template <class W, int NB, bool MASKED>
inline void shrink_block(const float* x, const W* a, int64_t in, int64_t sa, float* h, Tail tail) {
  __m256 even[NB], odd[NB];
  for (int k = 0; k < NB; ++k) {
    even[k] = _mm256_setzero_ps();
    odd[k] = _mm256_setzero_ps();
  }
  auto load = [tail](const W* p, int k) { return (MASKED && k == NB - 1) ? load_tail(p, tail) : load8(p); };
  int64_t i = 0;
  for (; i + 1 < in; i += 2) {  // two rows of A at a time: twice the independent FMA chains
    const __m256 x0 = _mm256_broadcast_ss(x + i);
    const __m256 x1 = _mm256_broadcast_ss(x + i + 1);
    const W* r0 = a + i * sa;
    const W* r1 = r0 + sa;
    for (int k = 0; k < NB; ++k) {
      even[k] = _mm256_fmadd_ps(x0, load(r0 + 8 * k, k), even[k]);
      odd[k] = _mm256_fmadd_ps(x1, load(r1 + 8 * k, k), odd[k]);
    }
  }
  if (i < in) {
    const __m256 x0 = _mm256_broadcast_ss(x + i);
    for (int k = 0; k < NB; ++k) even[k] = _mm256_fmadd_ps(x0, load(a + i * sa + 8 * k, k), even[k]);
  }
  for (int k = 0; k < NB; ++k) _mm256_storeu_ps(h + 8 * k, _mm256_add_ps(even[k], odd[k]));
}

// h[0 : width] = x @ a[:, 0 : width], in blocks of up to 32 columns (h has room for width
// rounded up to 32).
template <class W>
inline void shrink(const float* x, const W* a, int64_t in, int64_t sa, int64_t width, float* h) {
  int64_t c = 0;
  for (; c + 32 <= width; c += 32) shrink_block<W, 4, false>(x, a + c, in, sa, h + c, kNoTail);
  const int64_t rest = width - c;
  if (rest == 0) return;
  const int full = static_cast<int>(rest / 8);
  const int lanes = static_cast<int>(rest % 8);
  if (lanes == 0) {
    switch (full) {
      case 1: shrink_block<W, 1, false>(x, a + c, in, sa, h + c, kNoTail); break;
      case 2: shrink_block<W, 2, false>(x, a + c, in, sa, h + c, kNoTail); break;
      default: shrink_block<W, 3, false>(x, a + c, in, sa, h + c, kNoTail); break;
    }
    return;
  }
  const Tail tail = tail_of(lanes);
  switch (full) {
    case 0: shrink_block<W, 1, true>(x, a + c, in, sa, h + c, tail); break;
    case 1: shrink_block<W, 2, true>(x, a + c, in, sa, h + c, tail); break;
    case 2: shrink_block<W, 3, true>(x, a + c, in, sa, h + c, tail); break;
    default: shrink_block<W, 4, true>(x, a + c, in, sa, h + c, tail); break;
  }
}

// out[0 : outf] += h[0 : width] @ b[0 : width, 0 : outf] (row stride sb), 32 outputs at a time.
template <class W>
inline void expand(const float* h, const W* b, int64_t width, int64_t outf, int64_t sb, float* out) {
  int64_t o = 0;
  for (; o + 32 <= outf; o += 32) {
    __m256 v0 = _mm256_loadu_ps(out + o);
    __m256 v1 = _mm256_loadu_ps(out + o + 8);
    __m256 v2 = _mm256_loadu_ps(out + o + 16);
    __m256 v3 = _mm256_loadu_ps(out + o + 24);
    for (int64_t j = 0; j < width; ++j) {
      const __m256 hj = _mm256_broadcast_ss(h + j);
      const W* r = b + j * sb + o;
      v0 = _mm256_fmadd_ps(hj, load8(r), v0);
      v1 = _mm256_fmadd_ps(hj, load8(r + 8), v1);
      v2 = _mm256_fmadd_ps(hj, load8(r + 16), v2);
      v3 = _mm256_fmadd_ps(hj, load8(r + 24), v3);
    }
    _mm256_storeu_ps(out + o, v0);
    _mm256_storeu_ps(out + o + 8, v1);
    _mm256_storeu_ps(out + o + 16, v2);
    _mm256_storeu_ps(out + o + 24, v3);
  }
  for (; o + 8 <= outf; o += 8) {
    __m256 v = _mm256_loadu_ps(out + o);
    for (int64_t j = 0; j < width; ++j) v = _mm256_fmadd_ps(_mm256_broadcast_ss(h + j), load8(b + j * sb + o), v);
    _mm256_storeu_ps(out + o, v);
  }
  if (o < outf) expand_last(h, b + o, width, outf - o, sb, out + o);
}

// Prefill rows: TB tokens of one row at a time, so each weight loaded feeds TB FMAs.

// h[t * sh + c] (c < 8*NV) = x_t @ a[:, c] for TB tokens (x_t = x + t * sxt); MASKED: the last vector
// reads only the tail's lanes (and writes zeros in the others).
template <class W, int TB, int NV, bool MASKED>
inline void shrink_tokens_block(const float* x, int64_t sxt, const W* a, int64_t in, int64_t sa, float* h,
                                int64_t sh, Tail tail) {
  __m256 acc[TB][NV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < in; ++i) {
    const W* r = a + i * sa;
    __m256 av[NV];
    for (int v = 0; v < NV; ++v) av[v] = (MASKED && v == NV - 1) ? load_tail(r + 8 * v, tail) : load8(r + 8 * v);
    for (int t = 0; t < TB; ++t) {
      const __m256 xt = _mm256_broadcast_ss(x + t * sxt + i);
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_fmadd_ps(xt, av[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(h + t * sh + 8 * v, acc[t][v]);
}

// h[t * sh : t * sh + width] = x_t @ a[:, :width] for TB tokens, 16 columns at a time.
template <class W, int TB>
inline void shrink_tokens(const float* x, int64_t sxt, const W* a, int64_t in, int64_t sa, int64_t width,
                          float* h, int64_t sh) {
  int64_t c = 0;
  for (; c + 16 <= width; c += 16) shrink_tokens_block<W, TB, 2, false>(x, sxt, a + c, in, sa, h + c, sh, kNoTail);
  const int64_t rest = width - c;
  if (rest == 0) return;
  if (rest == 8) {
    shrink_tokens_block<W, TB, 1, false>(x, sxt, a + c, in, sa, h + c, sh, kNoTail);
    return;
  }
  const Tail tail = tail_of(static_cast<int>(rest % 8));
  if (rest < 8) {
    shrink_tokens_block<W, TB, 1, true>(x, sxt, a + c, in, sa, h + c, sh, tail);
  } else {
    shrink_tokens_block<W, TB, 2, true>(x, sxt, a + c, in, sa, h + c, sh, tail);
  }
}

// out_t[0 : outf] += h[t * sh : t * sh + width] @ b[0 : width, 0 : outf] for TB tokens
// (out_t = out + t * sot), 16 outputs at a time.
template <class W, int TB>
inline void expand_tokens(const float* h, int64_t sh, const W* b, int64_t width, int64_t outf, int64_t sb,
                          float* out, int64_t sot) {
  int64_t o = 0;
  for (; o + 16 <= outf; o += 16) {
    __m256 acc[TB][2];
    for (int t = 0; t < TB; ++t) {
      acc[t][0] = _mm256_loadu_ps(out + t * sot + o);
      acc[t][1] = _mm256_loadu_ps(out + t * sot + o + 8);
    }
    for (int64_t j = 0; j < width; ++j) {
      const W* r = b + j * sb + o;
      const __m256 b0 = load8(r), b1 = load8(r + 8);
      for (int t = 0; t < TB; ++t) {
        const __m256 hj = _mm256_broadcast_ss(h + t * sh + j);
        acc[t][0] = _mm256_fmadd_ps(hj, b0, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(hj, b1, acc[t][1]);
      }
    }
    for (int t = 0; t < TB; ++t) {
      _mm256_storeu_ps(out + t * sot + o, acc[t][0]);
      _mm256_storeu_ps(out + t * sot + o + 8, acc[t][1]);
    }
  }
  if (o < outf) {  // the last outputs, token by token
    for (int t = 0; t < TB; ++t) expand(h + t * sh, b + o, width, outf - o, sb, out + t * sot + o);
  }
}

constexpr int kTokenBlock = 4;
constexpr int64_t kHiddenStride = kMaxWidth + 32;

// TB consecutive tokens of one row (x and out point at the first).
template <class W, int TB>
inline void row_tokens(const float* x, int64_t sxt, const W* a, int64_t in, int64_t sa, const W* b,
                       int64_t width, int64_t outf, int64_t sb, float* out, int64_t sot) {
  alignas(32) float h[TB * kHiddenStride];
  shrink_tokens<W, TB>(x, sxt, a, in, sa, width, h, kHiddenStride);
  expand_tokens<W, TB>(h, kHiddenStride, b, width, outf, sb, out, sot);
}

}  // namespace

// One call's arguments (strides in elements). A[w] starts at a + w * sa_row and its row i at
// + i * sa_in (columns contiguous); B likewise; a and b hold float (af_bgmv_f32) or Half (af_bgmv_f16w); x row i, token t at x + i * sx + t * sx_tok, out
// likewise with so and so_tok.
// The Python side keeps one per bound slot bank and rewrites per call the rows, tokens, slot ids (idx),
// x, out, their strides and the thread count.
struct AfBgmvArgs {
  int64_t batch, in, width, outf;
  const void* a;
  int64_t sa_row, sa_in;
  const void* b;
  int64_t sb_row, sb_r;
  const int64_t* idx;  // row i's slot
  const float* x;
  int64_t sx;
  float* out;
  int64_t so;
  int64_t threads;
  int64_t tokens, sx_tok, so_tok;
  const int64_t* ranks;  // null: every row multiplies `width` rank columns; else slot w's rank (0: none)
};

namespace {

// Rank columns row `row` multiplies: its slot's rank, at most the call's width (0: nothing to add).
inline int64_t row_width(const AfBgmvArgs* p, int64_t w) {
  if (!p->ranks) return p->width;
  const int64_t r = p->ranks[w];
  return r < p->width ? r : p->width;
}

// Splits items 0..n-1 into at most `parts` contiguous ranges of about equal total cost (cost(i) >= 0,
// here the rank columns an item multiplies): range k is [bounds[k], bounds[k + 1]). A plain static
// split would leave one thread idle where base-model rows (cost 0) or low-rank rows cluster at one
// end of the batch. Items stay in order, so neighbouring rows on one adapter stay on one thread, which
// reads its weights from memory once. Empty when nothing costs anything.
template <class Cost>
std::vector<int64_t> split_by_cost(int64_t n, int parts, Cost cost) {
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost(i);
  const int64_t total = prefix[n];
  if (total == 0) return {};
  if (parts > n) parts = static_cast<int>(n);
  std::vector<int64_t> bounds(parts + 1, 0);
  bounds[parts] = n;
  for (int k = 1; k < parts; ++k) {
    const int64_t target = total * k / parts;
    int64_t j = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    if (j > 0 && target - prefix[j - 1] < prefix[j] - target) --j;  // the nearer of the two ends
    bounds[k] = std::max(j, bounds[k - 1]);
  }
  return bounds;
}

// One decode row: out[row] += (x[row] @ A[w][:, :r]) @ B[w][:r] with its own rank r.
template <class W>
inline void decode_row(const AfBgmvArgs* p, int64_t row) {
  const int64_t w = p->idx[row];
  const int64_t cols = row_width(p, w);
  if (cols <= 0) return;
  alignas(32) float h[kMaxWidth + 32];
  shrink(p->x + row * p->sx, static_cast<const W*>(p->a) + w * p->sa_row, p->in, p->sa_in, cols, h);
  expand(h, static_cast<const W*>(p->b) + w * p->sb_row, cols, p->outf, p->sb_r, p->out + row * p->so);
}

// Up to kTokenBlock tokens of one prefill row, from token t0.
template <class W>
inline void prefill_block(const AfBgmvArgs* p, int64_t row, int64_t t0) {
  const int64_t w = p->idx[row];
  const int64_t cols = row_width(p, w);
  if (cols <= 0) return;
  const float* x = p->x + row * p->sx + t0 * p->sx_tok;
  const W* a = static_cast<const W*>(p->a) + w * p->sa_row;
  const W* b = static_cast<const W*>(p->b) + w * p->sb_row;
  float* out = p->out + row * p->so + t0 * p->so_tok;
  switch (p->tokens - t0 < kTokenBlock ? p->tokens - t0 : kTokenBlock) {
    case 1: row_tokens<W, 1>(x, p->sx_tok, a, p->in, p->sa_in, b, cols, p->outf, p->sb_r, out, p->so_tok); break;
    case 2: row_tokens<W, 2>(x, p->sx_tok, a, p->in, p->sa_in, b, cols, p->outf, p->sb_r, out, p->so_tok); break;
    case 3: row_tokens<W, 3>(x, p->sx_tok, a, p->in, p->sa_in, b, cols, p->outf, p->sb_r, out, p->so_tok); break;
    default: row_tokens<W, 4>(x, p->sx_tok, a, p->in, p->sa_in, b, cols, p->outf, p->sb_r, out, p->so_tok); break;
  }
}

// One call (af_bgmv_f32, af_bgmv_f16w) over weights of type W.
template <class W>
int bgmv(const AfBgmvArgs* p) {
  const int64_t batch = p->batch, width = p->width, tokens = p->tokens;
  if (width < 1 || width > kMaxWidth || tokens < 1 || !p->idx) return 1;
  const int threads = p->threads > 1 ? static_cast<int>(p->threads) : 1;
  // a decode step: one item per row (one streaming pass over its weights); a prefill: one per row and
  // block of tokens, a row's blocks next to each other
  const int64_t blocks = tokens == 1 ? 1 : (tokens + kTokenBlock - 1) / kTokenBlock;
  const int64_t items = batch * blocks;
  const std::vector<int64_t> bounds = split_by_cost(items, threads, [p, blocks](int64_t item) {
    return row_width(p, p->idx[item / blocks]);
  });
  if (bounds.empty()) return 0;  // no row has anything to add
  const int parts = static_cast<int>(bounds.size()) - 1;
#pragma omp parallel num_threads(parts) if (parts > 1)
  {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    for (int part = me; part < parts; part += team) {  // (a smaller team than asked: parts in turn)
      for (int64_t item = bounds[part]; item < bounds[part + 1]; ++item) {
        if (tokens == 1) {
          decode_row<W>(p, item);
        } else {
          prefill_block<W>(p, item / blocks, (item % blocks) * kTokenBlock);
        }
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

int64_t af_bgmv_max_width() { return kMaxWidth; }

int64_t af_bgmv_args_size() { return sizeof(AfBgmvArgs); }

// out += (x @ A) @ B as above: returns 0, or 1 when width or tokens is out of range or no slot ids are
// given (nothing is written). af_bgmv_f32 reads float32 weights, af_bgmv_f16w float16 ones.
int af_bgmv_f32(const AfBgmvArgs* p) { return bgmv<float>(p); }

int af_bgmv_f16w(const AfBgmvArgs* p) { return bgmv<Half>(p); }

}  // extern "C"
