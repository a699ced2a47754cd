// cifarlab's CPU kernels, for the training step of small convolutional networks on CPUs where
// PyTorch's own kernels leave speed behind. Built at run time by cifarlab/cpu_kernels.py
// (g++ -O3 -march=native); where this does not compile (no AVX2/FMA, no compiler) PyTorch's
// kernels are used instead.
//
// 1. cl_conv3x3_wgrad: weight (and bias) gradient of a 3x3, stride-1, 'same'-padded
//    convolution on channels-last float32 data:
//
//      dW[kh][kw][o][i] = sum over images n and pixels (h, w) of dY[n][h][w][o] * X[n][h+kh-1][w+kw-1][i]
//
//    Why: on AVX2 CPUs (no AVX-512) oneDNN runs this as its older 'jit:avx2' backward-weights
//    kernel at 40 to 70 GFLOP/s on two cores, against 100 to 150 for its forward convolution of
//    the same size; in the notebook's keras-deep net it was 40% of a training step. This is a
//    plain register-blocked outer product, at about 110 GFLOP/s there with warm caches.
//
//    Layout of the work: the output rows are split into one contiguous range per thread, each
//    thread summing into its own copy of dW; a range is walked in chunks of a few image rows
//    (small enough to stay in L2) and, for each of the nine kernel taps, the pixels of a chunk
//    are streamed once per block of 6 x 16 weights, held in 12 AVX registers. Padding is never
//    materialised: a tap's out-of-image rows and columns are left out of its loops.
//
// 2. cl_dropout: inverted dropout in one pass. Why: PyTorch's CPU dropout draws its mask with
//    bernoulli_ (about 10 ns per element here, 6% of a keras-deep step), then divides and
//    multiplies in two more passes. Here each element's keep/drop comes from a keyed
//    counter-based hash of its index, vectorised, so the mask does not depend on the thread
//    count, and the output and the scaled mask are written in the same pass. cl_dropout_bf16
//    does the same for bfloat16 tensors (bf16 autocast), where bernoulli_ took 23% of the step.
//
// 3. cl_affine_warp: Keras' ImageDataGenerator transform (a per-image affine map, order-1
//    interpolation, scipy's boundary modes) for a whole batch, one image per task. Why: the
//    batched PyTorch formulation (grid_sample) makes a float copy of the batch and a coordinate
//    grid in memory and runs at about 60,000 CIFAR images/s on two cores; here each output pixel
//    is computed once, from the image packed into L1, at about 3 ns a pixel on two cores.
//
// 4. cl_relu_maxpool2 / cl_relu_maxpool2_bwd: ReLU followed by 2x2, stride-2 max pooling, as one
//    pass forward and one backward, on channels-last float32 or bfloat16 data. Why: PyTorch runs
//    them as four passes over the full-size tensor (ReLU, the pool, the pool's backward into a
//    zeroed gradient, ReLU's backward) and keeps int64 indices; in a profile of the keras-deep
//    step on an AVX-512 CPU, where oneDNN's convolutions leave little else, all its ReLUs and
//    pools took 14 of 87 ms.
//    Max and ReLU commute (ReLU is monotone), so the pool reads the raw input and applies ReLU
//    to the quarter-size result; one byte per output element records which input won and
//    whether ReLU blocked it. In bfloat16 (bf16 autocast) they matter more: there PyTorch's ReLUs,
//    pools and their backward passes took 14 ms of a 44 ms step on an AMX Xeon.
//    cl_maxpool2 is the same pool without the ReLU, for nets that pool a convolution's output
//    (airbench's groups: conv, pool, batch norm, GELU). Why: in a profile of the `fast` recipe's
//    bf16 step on an AMX Xeon, PyTorch's 2x2 pools, their backward passes and the zero fill
//    those write into took about a quarter of the step.
//
// 5. cl_keras_rmsprop: Keras' RMSprop update of one tensor in one pass. Why: as multi-tensor
//    ops, PyTorch runs it on the CPU as five passes per tensor (plus a temporary for the
//    denominator), about 4 ms of a keras-deep step whose 2.2 million weights are mostly the
//    first dense layer's; one pass reads the weight, gradient and velocity once.

#if !defined(__AVX2__) || !defined(__FMA__)
#error "cifarlab's CPU kernels need AVX2 and FMA"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// out[r][0..15] += sum over pixels of b[r] * a[0..15], for r < RB; a is the vectorised operand
// (16 consecutive channels per pixel), b the broadcast one. Pixels come as nr rows of np, with
// strides sa / sb between pixels and ra / rb between rows.
template <int RB>
void block(const float* a, long sa, const float* b, long sb, int np, int nr, long ra, long rb, float* out,
           long so) {
  // Named accumulators rather than an array: GCC keeps these in registers, an array it spills.
  __m256 c0a, c0b, c1a, c1b, c2a, c2b, c3a, c3b, c4a, c4b, c5a, c5b;
#define CL_LOAD(r) if (RB > r) { c##r##a = _mm256_loadu_ps(out + r * so); c##r##b = _mm256_loadu_ps(out + r * so + 8); }
#define CL_FMA(r)                                                     \
  if (RB > r) {                                                       \
    __m256 s = _mm256_broadcast_ss(bp + r);                           \
    c##r##a = _mm256_fmadd_ps(s, a0, c##r##a);                        \
    c##r##b = _mm256_fmadd_ps(s, a1, c##r##b);                        \
  }
#define CL_STORE(r) if (RB > r) { _mm256_storeu_ps(out + r * so, c##r##a); _mm256_storeu_ps(out + r * so + 8, c##r##b); }
  CL_LOAD(0) CL_LOAD(1) CL_LOAD(2) CL_LOAD(3) CL_LOAD(4) CL_LOAD(5)
  for (int q = 0; q < nr; ++q) {
    const float* ap = a + q * ra;
    const float* bp = b + q * rb;
    for (int p = 0; p < np; ++p, ap += sa, bp += sb) {
      const __m256 a0 = _mm256_loadu_ps(ap), a1 = _mm256_loadu_ps(ap + 8);
      CL_FMA(0) CL_FMA(1) CL_FMA(2) CL_FMA(3) CL_FMA(4) CL_FMA(5)
    }
  }
  CL_STORE(0) CL_STORE(1) CL_STORE(2) CL_STORE(3) CL_STORE(4) CL_STORE(5)
#undef CL_LOAD
#undef CL_FMA
#undef CL_STORE
}

void block_any(int nb, const float* a, long sa, const float* b, long sb, int np, int nr, long ra, long rb,
               float* out, long so) {
  switch (nb) {
    case 6: block<6>(a, sa, b, sb, np, nr, ra, rb, out, so); break;
    case 5: block<5>(a, sa, b, sb, np, nr, ra, rb, out, so); break;
    case 4: block<4>(a, sa, b, sb, np, nr, ra, rb, out, so); break;
    case 3: block<3>(a, sa, b, sb, np, nr, ra, rb, out, so); break;
    case 2: block<2>(a, sa, b, sb, np, nr, ra, rb, out, so); break;
    default: block<1>(a, sa, b, sb, np, nr, ra, rb, out, so); break;
  }
}

// Sums output rows [r0, r1) of the n * h rows into out, laid out (9, NB, NV): NV is the
// vectorised side (input channels when vec_x, else output channels), NB the other.
void worker(const float* x, const float* dy, float* out, float* bias, int n, int h, int w, int ci, int co,
            bool vec_x, long r0, long r1, int chunk) {
  const int NV = vec_x ? ci : co, NB = vec_x ? co : ci;
  const int nblk = (NB + 5) / 6;  // balanced blocks of at most 6 rows: 32 = 6+6+5+5+5+5, not 6*5+2
  // a chunk starting at row c: at most `chunk` rows, within [r0, r1) and within one image
  auto chunk_end = [&](long c) { return std::min(std::min(r1, c + chunk), (c / h + 1) * h); };
  for (long c0 = r0; c0 < r1;) {
    const long img = c0 / h;
    const long c1 = chunk_end(c0);
    const int h0 = c0 - img * h, h1 = c1 - img * h;
    // Ask for the next chunk's rows now: in training X and dY come from DRAM, and the taps below
    // walk them in a pattern the hardware prefetcher picks up too late. That chunk reads dY rows
    // [c1, c2) and X rows up to c2; X rows up to c1 are this chunk's already.
    if (c1 < r1) {
      const long c2 = chunk_end(c1);
      const long x_rows = std::max(0L, std::min(c2 + 1, n * (long)h) - (c1 + 1));
      const char* nx = (const char*)(x + (c1 + 1) * (long)w * ci);
      const char* nd = (const char*)(dy + c1 * (long)w * co);
      for (long o = 0; o < x_rows * w * ci * (long)sizeof(float); o += 64) _mm_prefetch(nx + o, _MM_HINT_T1);
      for (long o = 0; o < (c2 - c1) * w * co * (long)sizeof(float); o += 64) _mm_prefetch(nd + o, _MM_HINT_T1);
    }
    for (int kh = 0; kh < 3; ++kh) {
      const int lo = std::max(h0, 1 - kh), hi = std::min(h1, h + 1 - kh);  // rows reading inside the image
      if (lo >= hi) continue;
      for (int kw = 0; kw < 3; ++kw) {
        const int wlo = std::max(0, 1 - kw), whi = std::min(w, w + 1 - kw);  // likewise for columns
        float* tap = out + (long)(kh * 3 + kw) * NB * NV;
        const float* xp = x + ((img * h + lo + kh - 1) * w + wlo + kw - 1) * ci;
        const float* dp = dy + ((img * h + lo) * w + wlo) * co;
        const float* a = vec_x ? xp : dp;
        const float* b = vec_x ? dp : xp;
        const long sa = vec_x ? ci : co, sb = vec_x ? co : ci;
        for (int k = 0, bb = 0; k < nblk; ++k) {
          const int nb = NB / nblk + (k < NB % nblk);
          for (int vv = 0; vv < NV; vv += 16)
            block_any(nb, a + vv, sa, b + bb, sb, whi - wlo, hi - lo, (long)w * sa, (long)w * sb,
                      tap + (long)bb * NV + vv, NV);
          bb += nb;
        }
      }
    }
    if (bias)  // the bias gradient, while this chunk's dY is still in cache
      for (const float* d = dy + c0 * (long)w * co; d < dy + c1 * (long)w * co; d += co)
        for (int o = 0; o < co; ++o) bias[o] += d[o];
    c0 = c1;
  }
}

}  // namespace

// x: (n, h, w, ci) and dy: (n, h, w, co), contiguous float32. Writes out (9, co, ci) when ci is a
// multiple of 16, else (9, ci, co) when co is, and the bias gradient (co) to bias unless it is
// null; returns 1 (and writes nothing) when neither channel count is a multiple of 16.
extern "C" int cl_conv3x3_wgrad(const float* x, const float* dy, float* out, float* bias, int n, int h, int w,
                                int ci, int co, int threads, int chunk) {
  const bool vec_x = ci % 16 == 0;
  if (!vec_x && co % 16 != 0) return 1;
  const long rows = (long)n * h, size = 9L * ci * co;
  threads = (int)std::max(1L, std::min<long>(threads, rows));
  chunk = std::max(1, chunk);
  // each thread but the first sums into its own buffer: dW, then the bias gradient
  std::vector<std::vector<float>> partial(threads - 1, std::vector<float>(size + co, 0.f));
  std::memset(out, 0, size * sizeof(float));
  if (bias) std::memset(bias, 0, co * sizeof(float));
  // OpenMP rather than threads of our own: the library binds to the OpenMP runtime PyTorch has
  // already loaded (same soname), so this reuses PyTorch's worker threads instead of competing
  // with them while they spin-wait after PyTorch's last parallel op.
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    float* dst = t ? partial[t - 1].data() : out;
    float* bdst = bias ? (t ? partial[t - 1].data() + size : bias) : nullptr;
    worker(x, dy, dst, bdst, n, h, w, ci, co, vec_x, rows * t / threads, rows * (t + 1) / threads, chunk);
  }
  for (auto& p : partial) {
    for (long i = 0; i < size; ++i) out[i] += p[i];
    if (bias)
      for (int o = 0; o < co; ++o) bias[o] += p[size + o];
  }
  return 0;
}

namespace {

// A 32-bit integer hash with low bias (Wellons' "lowbias32" construction, 2018); applied twice
// with the seed's halves mixed in between, it serves as a keyed counter-based generator. Only
// 32-bit multiplies, so the loop below vectorises: PyTorch's per-element draws cost about 10 ns,
// this about 1.
inline uint32_t hash32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x21f0aaadu;
  h ^= h >> 15;
  h *= 0x735a2d97u;
  h ^= h >> 15;
  return h;
}

// Elements [first, first + m) of the stream: hash indices first + j, arrays indexed by j.
void dropout_block(const float* x, float* out, float* noise, long first, int m, uint32_t drop_below, float scale,
                   uint64_t seed) {
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int j = 0; j < m; ++j) {
    const uint32_t u = hash32(hash32((uint32_t)(first + j) + k0) ^ k1);
    const float keep = u >= drop_below ? scale : 0.f;
    noise[j] = keep;
    out[j] = x[j] * keep;
  }
}

// bfloat16 as PyTorch stores it: the top half of a float's bits. The conversion to it rounds to
// nearest even, as PyTorch's does, and keeps NaN a NaN.
inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline uint16_t to_bf16(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Widening bfloat16 to float is exact. Narrowing by truncation (store1, store8) is exact only for
// values that came from bfloat16, as all that the ReLU-pool kernels store do (one of their inputs,
// or zero; NaN's bits included); to_bf16 rounds any float.
inline float load1(float v) { return v; }
inline float load1(uint16_t v) {
  const uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = (uint16_t)(float_bits(v) >> 16); }
// The same for eight elements at a time.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v), 16);  // 0..65535: packus keeps it
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

void dropout_range(const float* x, float* out, float* noise, long lo, long hi, uint32_t drop_below, float scale,
                   uint64_t seed) {
  dropout_block(x + lo, out + lo, noise + lo, lo, (int)(hi - lo), drop_below, scale, seed);
}

// bfloat16 in blocks through float buffers in L1, so that each of the three loops vectorises
// (one loop that converts and hashes together does not); the product is rounded once, as
// PyTorch multiplies bfloat16 tensors.
void dropout_range(const uint16_t* x, uint16_t* out, uint16_t* noise, long lo, long hi, uint32_t drop_below,
                   float scale, uint64_t seed) {
  constexpr int kBlock = 512;
  float xf[kBlock], of[kBlock], nf[kBlock];
  for (long b = lo; b < hi; b += kBlock) {
    const int m = (int)std::min<long>(kBlock, hi - b);
    for (int j = 0; j < m; ++j) xf[j] = load1(x[b + j]);
    dropout_block(xf, of, nf, b, m, drop_below, scale, seed);
    for (int j = 0; j < m; ++j) out[b + j] = to_bf16(of[j]), noise[b + j] = to_bf16(nf[j]);
  }
}

template <typename T>
void dropout(const T* x, T* out, T* noise, long n, uint32_t drop_below, float scale, uint64_t seed, int threads) {
  threads = (int)std::max(1L, std::min<long>(threads, n / 4096 + 1));  // small tensors: not worth a thread
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t)
    dropout_range(x, out, noise, n * t / threads, n * (t + 1) / threads, drop_below, scale, seed);
}

}  // namespace

// out = x * noise and noise = keep / (1 - p) over n < 2^32 elements, where an element is kept when its
// 32-bit draw is at least drop_below = round(p * 2^32) (so with probability 1 - p to within
// 2^-32). Elements are independent of their neighbours' memory layout: x, out and noise must
// share one dense layout.
extern "C" void cl_dropout(const float* x, float* out, float* noise, long n, uint32_t drop_below, float scale,
                           uint64_t seed, int threads) {
  dropout(x, out, noise, n, drop_below, scale, seed, threads);
}

// The same for bfloat16 tensors (bf16 autocast): the same mask for the same seed; scale is the
// bfloat16 value of 1 / (1 - p), as PyTorch's bfloat16 dropout scales by it.
extern "C" void cl_dropout_bf16(const uint16_t* x, uint16_t* out, uint16_t* noise, long n, uint32_t drop_below,
                                float scale, uint64_t seed, int threads) {
  dropout(x, out, noise, n, drop_below, scale, seed, threads);
}

namespace {

// Python's floor remainder (the result takes the sign of m), as torch.remainder computes it.
inline double floor_mod(double a, double m) {
  const double r = std::fmod(a, m);
  return (r != 0 && ((r < 0) != (m < 0))) ? r + m : r;
}

enum Fill { kNearest = 0, kReflect = 1, kWrap = 2, kConstant = 3 };

// Where scipy.ndimage's boundary mode reads source coordinate c of an axis of n pixels, for
// order-1 interpolation; clears `inside` for a point that mode 'constant' fills with cval.
// The result is then clamped into [0, n - 1] by the caller ('nearest' is that clamp alone).
template <int MODE>
inline double boundary(double c, int n, bool& inside) {
  if (MODE == kReflect) {  // mirrored about the outer pixel edges, -0.5 and n - 0.5: period 2n
    c = floor_mod(c + 0.5, 2.0 * n);
    return (c >= n ? 2.0 * n - c : c) - 0.5;
  }
  if (MODE == kWrap) {  // period n - 1: the first and last samples coincide
    if (n == 1) return 0;
    return (c >= 0 && c <= n - 1) ? c : floor_mod(c, n - 1.0);
  }
  if (MODE == kConstant) {
    // scipy fills every point outside [0, n - 1] with cval, however close; the tolerance only
    // absorbs the last-bit difference between its float64 coordinates and these.
    const double eps = 1e-9;
    inside = inside && c >= -eps && c <= n - 1 + eps;
  }
  return c;
}

// The source image as the warp reads it: padded by one column on the right and one row at
// the bottom (copies of the edge), so that every pixel has a right and a lower neighbour in
// memory. A neighbour past the edge is only ever read with weight 0 (the coordinate is clamped
// to the last pixel, where its fraction is 0), so the padding removes a branch per pixel. One
// uint32 per pixel, channel k in bits 8k to 8k + 7, for uint8 images of up to 4 channels
// (PACKED: one load fetches every channel); else one float plane per channel.
struct Padded {
  int c, h, w;
  long stride, plane;  // floats or words between rows, and between channel planes
  std::vector<uint32_t> buf;

  Padded(int c_, int h_, int w_, bool packed)
      : c(c_), h(h_), w(w_), stride(w_ + 1), plane((long)(h_ + 1) * (w_ + 1)),
        buf((packed ? 1 : c_) * plane) {}

  template <typename T>
  void fill_plane(const T* s, float* d) {
    for (int r = 0; r < h; ++r) {
      for (int q = 0; q < w; ++q) d[r * stride + q] = s[(long)r * w + q];
      d[r * stride + w] = d[r * stride + w - 1];
    }
    std::memcpy(d + h * stride, d + (h - 1) * stride, stride * sizeof(float));
  }

  void fill_packed(const uint8_t* s) {
    uint32_t* d = buf.data();
    const long hw = (long)h * w;
    for (int r = 0; r < h; ++r) {
      uint32_t* row = d + r * stride;
      const uint8_t* sr = s + (long)r * w;
      // channel by channel, so that each loop is one vectorised widen, shift and or
      for (int q = 0; q < w; ++q) row[q] = sr[q];
      for (int k = 1; k < c; ++k)
        for (int q = 0; q < w; ++q) row[q] |= (uint32_t)sr[k * hw + q] << (8 * k);
      row[w] = row[w - 1];
    }
    std::memcpy(d + h * stride, d + (h - 1) * stride, stride * sizeof(uint32_t));
  }
};

// One output pixel, scalar (for columns left over from the vector loop below): o[k * plane] =
// scale * bilinear sample of channel k at (sr, sc).
template <int MODE, bool PACKED>
inline void warp_pixel(const Padded& src, float* o, long plane, double sr, double sc, float fill, float scale) {
  const int c = src.c, h = src.h, w = src.w;
  bool inside = true;
  sr = boundary<MODE>(sr, h, inside);
  sc = boundary<MODE>(sc, w, inside);
  if (!inside) {
    for (int k = 0; k < c; ++k) o[k * plane] = fill;
    return;
  }
  sr = std::min(std::max(sr, 0.0), h - 1.0);  // beyond the edge, every mode reads the edge pixel
  sc = std::min(std::max(sc, 0.0), w - 1.0);
  const int r0 = (int)sr, c0 = (int)sc;  // non-negative, so truncation is floor
  const float fr = (float)(sr - r0), fc = (float)(sc - c0);
  const long i = r0 * src.stride + c0, down = src.stride;
  for (int k = 0; k < c; ++k) {
    float v00, v01, v10, v11;
    if constexpr (PACKED) {
      const uint32_t* s = src.buf.data() + i;
      v00 = (s[0] >> (8 * k)) & 255, v01 = (s[1] >> (8 * k)) & 255;
      v10 = (s[down] >> (8 * k)) & 255, v11 = (s[down + 1] >> (8 * k)) & 255;
    } else {
      const float* s = (const float*)src.buf.data() + k * src.plane + i;
      v00 = s[0], v01 = s[1], v10 = s[down], v11 = s[down + 1];
    }
    const float top = v00 + fc * (v01 - v00), bottom = v10 + fc * (v11 - v10);
    o[k * plane] = (top + fr * (bottom - top)) * scale;
  }
}

inline __m256d floor_mod_v(__m256d a, __m256d m) {  // a - floor(a / m) * m, for m > 0
  return _mm256_fnmadd_pd(_mm256_floor_pd(_mm256_div_pd(a, m)), m, a);
}

// boundary() for four coordinates; `inside` collects mode 'constant''s mask (all ones otherwise).
template <int MODE>
inline __m256d boundary_v(__m256d c, int n, __m256d& inside) {
  const __m256d nd = _mm256_set1_pd(n);
  if (MODE == kReflect) {
    const __m256d p = _mm256_set1_pd(2.0 * n);
    c = floor_mod_v(_mm256_add_pd(c, _mm256_set1_pd(0.5)), p);
    c = _mm256_blendv_pd(c, _mm256_sub_pd(p, c), _mm256_cmp_pd(c, nd, _CMP_GE_OQ));
    return _mm256_sub_pd(c, _mm256_set1_pd(0.5));
  }
  const __m256d last = _mm256_set1_pd(n - 1.0);
  if (MODE == kWrap) {
    if (n == 1) return _mm256_setzero_pd();
    const __m256d in = _mm256_and_pd(_mm256_cmp_pd(c, _mm256_setzero_pd(), _CMP_GE_OQ),
                                     _mm256_cmp_pd(c, last, _CMP_LE_OQ));
    return _mm256_blendv_pd(floor_mod_v(c, last), c, in);
  }
  if (MODE == kConstant) {
    const __m256d eps = _mm256_set1_pd(1e-9);  // as in boundary()
    inside = _mm256_and_pd(inside, _mm256_cmp_pd(c, _mm256_sub_pd(_mm256_setzero_pd(), eps), _CMP_GE_OQ));
    inside = _mm256_and_pd(inside, _mm256_cmp_pd(c, _mm256_add_pd(last, eps), _CMP_LE_OQ));
  }
  return c;
}

// Four output pixels at source coordinates (sr, sc): the index of their top-left neighbour in
// the padded image, the blend weights, and the inside mask (1.0 or 0.0; mode 'constant').
template <int MODE>
inline void taps4(__m256d sr, __m256d sc, int h, int w, long stride, __m128i& i00, __m128& fr, __m128& fc,
                  __m128& in) {
  __m256d inside = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
  sr = boundary_v<MODE>(sr, h, inside);
  sc = boundary_v<MODE>(sc, w, inside);
  const __m256d zero = _mm256_setzero_pd();
  sr = _mm256_min_pd(_mm256_max_pd(sr, zero), _mm256_set1_pd(h - 1.0));  // beyond the edge: the edge pixel
  sc = _mm256_min_pd(_mm256_max_pd(sc, zero), _mm256_set1_pd(w - 1.0));
  const __m256d r0 = _mm256_floor_pd(sr), c0 = _mm256_floor_pd(sc);
  fr = _mm256_cvtpd_ps(_mm256_sub_pd(sr, r0));
  fc = _mm256_cvtpd_ps(_mm256_sub_pd(sc, c0));
  i00 = _mm256_cvttpd_epi32(_mm256_fmadd_pd(r0, _mm256_set1_pd((double)stride), c0));  // exact: small integers
  if (MODE == kConstant) in = _mm256_cvtpd_ps(_mm256_and_pd(inside, _mm256_set1_pd(1.0)));
}

// Eight pixels' left and right neighbours, from two 64-bit gathers of (left, right) pairs for
// pixels 0-3 and 4-7 (half the loads of four 32-bit gathers); the 32-bit halves are then
// separated and put back in pixel order.
inline void neighbours8(const uint32_t* row, __m128i ia, __m128i ib, __m256i& left, __m256i& right) {
  const auto* base = (const long long*)row;
  const __m256 a = _mm256_castsi256_ps(_mm256_i32gather_epi64(base, ia, 4));
  const __m256 b = _mm256_castsi256_ps(_mm256_i32gather_epi64(base, ib, 4));
  // shuffle_ps leaves pixels in the order 0 1 4 5 2 3 6 7; the permute restores 0 to 7
  left = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(a, b, 0x88)), 0xD8);
  right = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8);
}

inline __m256 blend8(__m256 v00, __m256 v01, __m256 v10, __m256 v11, __m256 fr, __m256 fc) {
  const __m256 top = _mm256_fmadd_ps(fc, _mm256_sub_ps(v01, v00), v00);
  const __m256 bottom = _mm256_fmadd_ps(fc, _mm256_sub_ps(v11, v10), v10);
  return _mm256_fmadd_ps(fr, _mm256_sub_ps(bottom, top), top);
}

// One image: dst (c, h, w) = scale * bilinear sample of src at m @ (row, col, 1), with m the
// first two rows of the output-to-input matrix. Coordinates are computed in float64, as scipy
// computes them; values are blended in float32. Eight output pixels at a time: coordinates in
// two float64 halves, neighbours by AVX2 gathers from the padded image (a few KiB, in L1).
template <int MODE, bool PACKED>
void warp_image(const Padded& src, float* dst, const double* m, float fill, float scale) {
  const int c = src.c, h = src.h, w = src.w;
  const long plane = (long)h * w, down = src.stride;
  const __m256d step = _mm256_set_pd(3, 2, 1, 0);
  const __m256 vscale = _mm256_set1_ps(scale), vfill = _mm256_set1_ps(fill), half = _mm256_set1_ps(0.5f);
  const __m256i byte = _mm256_set1_epi32(255);
  for (int r = 0; r < h; ++r) {
    const double row_r = m[0] * r + m[2], row_c = m[3] * r + m[5];
    int q = 0;
    for (; q + 8 <= w; q += 8) {
      __m128i ia, ib;
      __m128 afr, afc, ain, bfr, bfc, bin;
      const __m256d qa = _mm256_add_pd(_mm256_set1_pd(q), step), qb = _mm256_add_pd(qa, _mm256_set1_pd(4));
      taps4<MODE>(_mm256_fmadd_pd(_mm256_set1_pd(m[1]), qa, _mm256_set1_pd(row_r)),
                  _mm256_fmadd_pd(_mm256_set1_pd(m[4]), qa, _mm256_set1_pd(row_c)), h, w, down, ia, afr, afc, ain);
      taps4<MODE>(_mm256_fmadd_pd(_mm256_set1_pd(m[1]), qb, _mm256_set1_pd(row_r)),
                  _mm256_fmadd_pd(_mm256_set1_pd(m[4]), qb, _mm256_set1_pd(row_c)), h, w, down, ib, bfr, bfc, bin);
      const __m256 fr = _mm256_set_m128(bfr, afr), fc = _mm256_set_m128(bfc, afc);
      __m256 inside;
      if (MODE == kConstant) inside = _mm256_cmp_ps(_mm256_set_m128(bin, ain), half, _CMP_GT_OQ);
      float* o = dst + (long)r * w + q;
      if constexpr (PACKED) {
        __m256i p00, p01, p10, p11;
        neighbours8(src.buf.data(), ia, ib, p00, p01);
        neighbours8(src.buf.data() + down, ia, ib, p10, p11);
        for (int k = 0; k < c; ++k) {
          const __m128i sh = _mm_cvtsi32_si128(8 * k);
          auto channel = [&](__m256i p) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(p, sh), byte)); };
          __m256 val = _mm256_mul_ps(blend8(channel(p00), channel(p01), channel(p10), channel(p11), fr, fc), vscale);
          if (MODE == kConstant) val = _mm256_blendv_ps(vfill, val, inside);
          _mm256_storeu_ps(o + k * plane, val);
        }
      } else {
        for (int k = 0; k < c; ++k) {
          const uint32_t* s = src.buf.data() + k * src.plane;
          __m256i v00, v01, v10, v11;
          neighbours8(s, ia, ib, v00, v01);
          neighbours8(s + down, ia, ib, v10, v11);
          __m256 val = _mm256_mul_ps(blend8(_mm256_castsi256_ps(v00), _mm256_castsi256_ps(v01),
                                            _mm256_castsi256_ps(v10), _mm256_castsi256_ps(v11), fr, fc), vscale);
          if (MODE == kConstant) val = _mm256_blendv_ps(vfill, val, inside);
          _mm256_storeu_ps(o + k * plane, val);
        }
      }
    }
    for (; q < w; ++q)
      warp_pixel<MODE, PACKED>(src, dst + (long)r * w + q, plane, row_r + m[1] * q, row_c + m[4] * q, fill, scale);
  }
}

template <bool PACKED>
void warp_one(int mode, const Padded& s, float* d, const double* m, float fill, float scale) {
  switch (mode) {
    case kReflect: warp_image<kReflect, PACKED>(s, d, m, fill, scale); break;
    case kWrap: warp_image<kWrap, PACKED>(s, d, m, fill, scale); break;
    case kConstant: warp_image<kConstant, PACKED>(s, d, m, fill, scale); break;
    default: warp_image<kNearest, PACKED>(s, d, m, fill, scale); break;
  }
}

template <typename T>
void warp_batch(const T* src, float* dst, const double* mats, long n, int c, int h, int w, int mode, float fill,
                float scale, int threads) {
  const long size = (long)c * h * w;
  const bool packed = std::is_same<T, uint8_t>::value && c <= 4;
  threads = (int)std::max(1L, std::min<long>(threads, n));
#pragma omp parallel num_threads(threads)
  {
    Padded pad(c, h, w, packed);  // one per thread, reused for each of its images
#pragma omp for schedule(static)
    for (long i = 0; i < n; ++i) {
      const T* s = src + i * size;
      if (i + 1 < n)  // a thread's images are consecutive: fetch the next one while this one is warped
        for (long j = 0; j < size * (long)sizeof(T); j += 64) __builtin_prefetch((const char*)(s + size) + j);
      if constexpr (std::is_same<T, uint8_t>::value) {
        if (packed) {
          pad.fill_packed(s);
          warp_one<true>(mode, pad, dst + i * size, mats + 6 * i, fill, scale);
          continue;
        }
      }
      for (int k = 0; k < c; ++k) pad.fill_plane(s + (long)k * h * w, (float*)pad.buf.data() + k * pad.plane);
      warp_one<false>(mode, pad, dst + i * size, mats + 6 * i, fill, scale);
    }
  }
}

}  // namespace

// Affine warp of a batch with order-1 (bilinear) interpolation and scipy.ndimage's boundary
// modes, as Keras' ImageDataGenerator applies it one image at a time: out[i] = scale * sample of
// x[i] at mats[i] @ (row, col, 1) for every output pixel. x: (n, c, h, w) contiguous, uint8 when
// x_is_u8 else float32; out: (n, c, h, w) float32; mats: (n, 2, 3) float64, mapping output
// (row, col, 1) to input (row, col); mode: 0 nearest, 1 reflect, 2 wrap, 3 constant, where
// points outside the image get `fill`. Returns 1 (and writes nothing) for an unknown mode.
extern "C" int cl_affine_warp(const void* x, int x_is_u8, float* out, const double* mats, long n, int c, int h,
                              int w, int mode, float fill, float scale, int threads) {
  if (mode < kNearest || mode > kConstant) return 1;
  if (x_is_u8)
    warp_batch((const uint8_t*)x, out, mats, n, c, h, w, mode, fill, scale, threads);
  else
    warp_batch((const float*)x, out, mats, n, c, h, w, mode, fill, scale, threads);
  return 0;
}

// Each output element's byte: the window position of the maximum (0 top-left, 1 top-right,
// 2 bottom-left, 3 bottom-right; the first of equal maxima, as PyTorch's pool picks it), plus
// kBlocked when ReLU zeroed it (the maximum <= 0), so that the backward pass passes no gradient.
namespace {
constexpr uint8_t kBlocked = 4;

// Eight channels of one window: the maximum, ReLU applied when RELU, and its byte (see kBlocked).
// The comparisons are written as PyTorch's pool writes them: a later element wins when greater, or NaN.
template <bool RELU, typename T>
inline void relu_max8(const T* a, const T* b, const T* c, const T* d, T* o, uint8_t* k) {
  const __m256 v[4] = {load8(a), load8(b), load8(c), load8(d)};
  __m256 best = v[0];
  __m256i at = _mm256_setzero_si256();
  for (int j = 1; j < 4; ++j) {
    const __m256 win = _mm256_or_ps(_mm256_cmp_ps(v[j], best, _CMP_GT_OQ), _mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
    best = _mm256_blendv_ps(best, v[j], win);
    at = _mm256_blendv_epi8(at, _mm256_set1_epi32(j), _mm256_castps_si256(win));
  }
  if (RELU) {
    const __m256 pass = _mm256_or_ps(_mm256_cmp_ps(best, _mm256_setzero_ps(), _CMP_GT_OQ),
                                     _mm256_cmp_ps(best, best, _CMP_UNORD_Q));
    best = _mm256_and_ps(best, pass);
    at = _mm256_or_si256(at, _mm256_andnot_si256(_mm256_castps_si256(pass), _mm256_set1_epi32(kBlocked)));
  }
  store8(o, best);
  const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(at), _mm256_extracti128_si256(at, 1));
  _mm_storel_epi64((__m128i*)k, _mm_packus_epi16(w16, w16));
}

// Calls f(r, base, oh) for each pooled row r of the n images' (h / 2) rows each, spread over the
// threads: `base` is the offset of the first input element of the row's 2x2 windows in the
// (n, h, w, c) input, oh the row's index within its image.
template <typename F>
void for_pooled_rows(int n, int h, int w, int c, int threads, F f) {
  const int ho = h / 2;
  const long rows = (long)n * ho;
  threads = (int)std::max(1L, std::min<long>(threads, rows));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; ++r) {
    const long img = r / ho, oh = r - img * ho;
    f(r, (img * h + 2 * oh) * (long)w * c, (int)oh);
  }
}

template <bool RELU, typename T>
void relu_maxpool2(const T* x, T* out, uint8_t* idx, int n, int h, int w, int c, int threads) {
  const int wo = w / 2, c8 = c - c % 8;
  for_pooled_rows(n, h, w, c, threads, [=](long r, long base, int) {
    const T* top = x + base;
    const T* bottom = top + (long)w * c;
    T* o = out + r * wo * (long)c;
    uint8_t* k = idx + r * wo * (long)c;
    for (int ow = 0; ow < wo; ++ow, top += 2 * c, bottom += 2 * c, o += c, k += c) {
      int ch = 0;
      for (; ch < c8; ch += 8) relu_max8<RELU>(top + ch, top + c + ch, bottom + ch, bottom + c + ch, o + ch, k + ch);
      for (; ch < c; ++ch) {
        const float v[4] = {load1(top[ch]), load1(top[c + ch]), load1(bottom[ch]), load1(bottom[c + ch])};
        float best = v[0];
        uint8_t at = 0;
        for (uint8_t j = 1; j < 4; ++j)
          if (v[j] > best || v[j] != v[j]) best = v[j], at = j;
        const bool pass = !RELU || best > 0 || best != best;
        store1(o + ch, pass ? best : 0.f);
        k[ch] = pass ? at : (uint8_t)(at | kBlocked);
      }
    }
  });
}

template <typename T>
void relu_maxpool2_bwd(const T* gout, const uint8_t* idx, T* gx, int n, int h, int w, int c, int threads) {
  const int ho = h / 2, wo = w / 2, c8 = c - c % 8;
  for_pooled_rows(n, h, w, c, threads, [=](long r, long base, int oh) {
    T* top = gx + base;
    T* bottom = top + (long)w * c;
    const T* g = gout + r * wo * (long)c;
    const uint8_t* k = idx + r * wo * (long)c;
    for (int ow = 0; ow < wo; ++ow, top += 2 * c, bottom += 2 * c, g += c, k += c) {
      int ch = 0;
      for (; ch < c8; ch += 8) {
        const __m256i at = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(k + ch)));
        const __m256 v = load8(g + ch);
        auto pick = [&](int j) { return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(at, _mm256_set1_epi32(j))), v); };
        store8(top + ch, pick(0));
        store8(top + c + ch, pick(1));
        store8(bottom + ch, pick(2));
        store8(bottom + c + ch, pick(3));
      }
      for (; ch < c; ++ch) {
        const uint8_t at = k[ch];
        const T v = g[ch], zero = T();
        top[ch] = at == 0 ? v : zero;
        top[c + ch] = at == 1 ? v : zero;
        bottom[ch] = at == 2 ? v : zero;
        bottom[c + ch] = at == 3 ? v : zero;
      }
    }
    if (w % 2) {  // the column the pool left out
      std::memset(top, 0, c * sizeof(T));
      std::memset(bottom, 0, c * sizeof(T));
    }
    if (h % 2 && oh == ho - 1)  // likewise the image's last row
      std::memset(bottom + c * (w % 2), 0, (long)w * c * sizeof(T));
  });
}

}  // namespace

// out = maxpool2x2(relu(x)) for x (n, h, w, c), out and idx (n, h / 2, w / 2, c), all contiguous;
// an odd last row or column is left out, as PyTorch's floor mode does. NaN wins a window as in
// PyTorch's pool and passes ReLU, as torch.relu lets it. The _bf16 form takes bfloat16 data
// (bf16 autocast), with the same results: max and ReLU only select, they never round.
extern "C" void cl_relu_maxpool2(const float* x, float* out, uint8_t* idx, int n, int h, int w, int c, int threads) {
  relu_maxpool2<true>(x, out, idx, n, h, w, c, threads);
}
extern "C" void cl_relu_maxpool2_bf16(const uint16_t* x, uint16_t* out, uint8_t* idx, int n, int h, int w, int c,
                                      int threads) {
  relu_maxpool2<true>(x, out, idx, n, h, w, c, threads);
}
// The same without the ReLU: out = maxpool2x2(x), idx as above (never kBlocked), so that
// cl_relu_maxpool2_bwd is its gradient too.
extern "C" void cl_maxpool2(const float* x, float* out, uint8_t* idx, int n, int h, int w, int c, int threads) {
  relu_maxpool2<false>(x, out, idx, n, h, w, c, threads);
}
extern "C" void cl_maxpool2_bf16(const uint16_t* x, uint16_t* out, uint8_t* idx, int n, int h, int w, int c,
                                 int threads) {
  relu_maxpool2<false>(x, out, idx, n, h, w, c, threads);
}

// The gradient of cl_relu_maxpool2 with respect to x: gx (n, h, w, c) gets gout at each window's
// recorded maximum unless ReLU blocked it, and zero everywhere else (odd last rows and columns too).
extern "C" void cl_relu_maxpool2_bwd(const float* gout, const uint8_t* idx, float* gx, int n, int h, int w, int c,
                                     int threads) {
  relu_maxpool2_bwd(gout, idx, gx, n, h, w, c, threads);
}
extern "C" void cl_relu_maxpool2_bwd_bf16(const uint16_t* gout, const uint8_t* idx, uint16_t* gx, int n, int h,
                                          int w, int c, int threads) {
  relu_maxpool2_bwd(gout, idx, gx, n, h, w, c, threads);
}

// Keras' RMSprop for n elements: g' = g + wd * p; v = rho * v + (1 - rho) * g'^2;
// p -= lr * g' / sqrt(v + eps). The arithmetic follows PyTorch's multi-tensor ops
// (cifarlab.optim.KerasRMSprop) step by step, fused multiply-adds where they use them, with the
// scalars rounded to float as they round them. The two then differ where PyTorch's CPU square
// root is not correctly rounded: 1 ulp off in about 0.7% of elements, and in some processes up
// to 3e-4 relative on part of a tensor (PyTorch 2.13, AVX-512 Xeon); this one's is.
namespace {

template <bool DECAY>
void rmsprop_range(float* p, const float* g, float* v, long lo, long hi, float neg_lr, float rho, float one_minus_rho,
                   float eps, float wd) {
  for (long i = lo; i < hi; ++i) {
    const float gi = DECAY ? std::fma(wd, p[i], g[i]) : g[i];
    const float vi = std::fma(one_minus_rho * gi, gi, v[i] * rho);
    v[i] = vi;
    p[i] = p[i] + neg_lr * gi / std::sqrt(vi + eps);
  }
}

}  // namespace

extern "C" void cl_keras_rmsprop(float* p, const float* g, float* v, long n, float neg_lr, float rho,
                                 float one_minus_rho, float eps, float wd, int threads) {
  threads = (int)std::max(1L, std::min<long>(threads, n / 16384 + 1));  // small tensors: not worth a thread
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const long lo = n * t / threads, hi = n * (t + 1) / threads;
    if (wd != 0.f)
      rmsprop_range<true>(p, g, v, lo, hi, neg_lr, rho, one_minus_rho, eps, wd);
    else
      rmsprop_range<false>(p, g, v, lo, hi, neg_lr, rho, one_minus_rho, eps, wd);
  }
}
