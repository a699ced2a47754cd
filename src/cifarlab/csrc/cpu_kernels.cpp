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
//    count, and the output and the scaled mask are written in the same pass.

#if !defined(__AVX2__) || !defined(__FMA__)
#error "cifarlab's CPU kernels need AVX2 and FMA"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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

void dropout_range(const float* x, float* out, float* noise, long lo, long hi, uint32_t drop_below,
                   float scale, uint64_t seed) {
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (long i = lo; i < hi; ++i) {
    const uint32_t u = hash32(hash32((uint32_t)i + k0) ^ k1);
    const float m = u >= drop_below ? scale : 0.f;
    noise[i] = m;
    out[i] = x[i] * m;
  }
}

}  // namespace

// out = x * noise and noise = keep / (1 - p) over n < 2^32 elements, where an element is kept when its
// 32-bit draw is at least drop_below = round(p * 2^32) (so with probability 1 - p to within
// 2^-32). Elements are independent of their neighbours' memory layout: x, out and noise must
// share one dense layout.
extern "C" void cl_dropout(const float* x, float* out, float* noise, long n, uint32_t drop_below, float scale,
                           uint64_t seed, int threads) {
  threads = (int)std::max(1L, std::min<long>(threads, n / 4096 + 1));  // small tensors: not worth a thread
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t)
    dropout_range(x, out, noise, n * t / threads, n * (t + 1) / threads, drop_below, scale, seed);
}
