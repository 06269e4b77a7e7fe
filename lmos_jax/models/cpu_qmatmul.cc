// Weight-only int8 / int4 matmul for XLA:CPU, y (B, O) = x (B, I) @ dequantize(q, scale),
// for the few rows of a decode step (B small). Built on first use by cpu_kernels.py with the
// host's compiler (-O3 -march=native) and called through the XLA FFI.
//
// Why it exists: a decode step at batch 1 streams every weight once, so its speed is the
// memory bandwidth. XLA:CPU converts int8 codes to float more slowly than float32 streams
// from memory (experiments/bench_qmatmul.py), so quantized weights decoded slower than
// dense ones. Here each 64-byte line of codes is converted in registers next to the
// multiply-add, and only the codes and scales cross the memory bus.
//
// Layouts (those of lmos_jax/models/quantized.py):
//   x     (B, I)  float32
//   q     int8: (I, O) codes; int4: (I/2, O), byte row r = input row r in its low nibble and
//         input row r + I/2 in its high nibble, both signed
//   scale (G, O)  float32, one per I/G consecutive inputs and output channel
//   y     (B, O)  float32
// Work: each task of XLA's intra-op thread pool reads code rows in memory order, 8 at a time,
// into sums held in the cache; the tasks split the rows (partial sums added at the end) when
// the outputs are few, the columns when they are many (an LM head's vocabulary).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float F16 __attribute__((vector_size(64)));   // 16 float32 lanes
typedef int32_t I16 __attribute__((vector_size(64)));  // 16 int32 lanes
typedef int8_t B16 __attribute__((vector_size(16)));   // 16 int8 codes

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t rows, in, out, groups, bits;
};

// 16 codes sign-extended to int32 lanes: one vpmovsxbd (GCC does not find it for
// __builtin_convertvector and builds the vector lane by lane).
inline I16 widen(const int8_t* p) {
#if defined(__AVX512F__)
  return (I16)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepi8_epi32(b), hi = _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8));
  I16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  B16 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, I16);
#endif
}

inline F16 load_f(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_f(float* p, F16 v) { std::memcpy(p, &v, sizeof(v)); }

// What one task computes: code rows [k0, k1) times columns [n0, n1) (a multiple of 16 wide),
// into `out` (rows x p.out, zeroed here): the whole product when the rows are all of them,
// a partial sum to add up otherwise.
struct Block {
  int64_t k0, k1, n0, n1;
  float* out;
};

// int8 codes are read row after row, KB rows at a time, each row's slice contiguous: the
// order the hardware prefetcher follows (a walk down a column tile, one cache line per row,
// ran at a fifth of the bandwidth). The sums live in `out` (a few kB, in L1 or L2); grouped
// scales multiply the converted codes, one per-channel scale multiplies the finished sums.
template <int KB, bool GROUPED>
void block_int8(const Problem& p, const Block& k) {
  const int64_t gsize = p.in / p.groups;
  for (int64_t b = 0; b < p.rows; ++b) std::fill(k.out + b * p.out + k.n0, k.out + b * p.out + k.n1, 0.f);
  for (int64_t r0 = k.k0; r0 < k.k1; r0 += KB) {
    const float* s = p.scale + (r0 / gsize) * p.out;
    for (int64_t n = k.n0; n < k.n1; n += 16) {
      F16 w[KB];
      for (int j = 0; j < KB; ++j) w[j] = __builtin_convertvector(widen(p.q + (r0 + j) * p.out + n), F16);
      if (GROUPED) {
        const F16 sv = load_f(s + n);
        for (int j = 0; j < KB; ++j) w[j] *= sv;
      }
      for (int64_t b = 0; b < p.rows; ++b) {
        const float* xb = p.x + b * p.in + r0;
        F16 acc[2] = {load_f(k.out + b * p.out + n), F16{}};  // two chains: FMA latency
        for (int j = 0; j < KB; ++j) acc[j % 2] += xb[j] * w[j];
        store_f(k.out + b * p.out + n, acc[0] + acc[1]);
      }
    }
  }
}

// The signed low and high nibbles of 16 sign-extended bytes as floats. With AVX-512, a
// 16-entry table lookup (vpermps reads an index's low 4 bits) replaces the shifts and the
// int-to-float conversions.
inline void nibbles(I16 c, F16& lo, F16& hi) {
#if defined(__AVX512F__)
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  lo = (F16)_mm512_permutexvar_ps((__m512i)c, table);
  hi = (F16)_mm512_permutexvar_ps((__m512i)(c >> 4), table);
#else
  lo = __builtin_convertvector((c << 28) >> 28, F16);
  hi = __builtin_convertvector(c >> 4, F16);
#endif
}

// The same for int4: packed row r carries inputs r (low nibble) and r + I/2 (high nibble).
template <int KB, bool GROUPED>
void block_int4(const Problem& p, const Block& k) {
  const int64_t half = p.in / 2, gsize = p.in / p.groups;
  for (int64_t b = 0; b < p.rows; ++b) std::fill(k.out + b * p.out + k.n0, k.out + b * p.out + k.n1, 0.f);
  for (int64_t r0 = k.k0; r0 < k.k1; r0 += KB) {
    const float* s_lo = p.scale + (r0 / gsize) * p.out;
    const float* s_hi = p.scale + ((half + r0) / gsize) * p.out;
    for (int64_t n = k.n0; n < k.n1; n += 16) {
      F16 lo[KB], hi[KB];
      for (int j = 0; j < KB; ++j) {
        const I16 c = widen(p.q + (r0 + j) * p.out + n);
        nibbles(c, lo[j], hi[j]);
      }
      if (GROUPED) {
        const F16 sl = load_f(s_lo + n), sh = load_f(s_hi + n);
        for (int j = 0; j < KB; ++j) lo[j] *= sl, hi[j] *= sh;
      }
      for (int64_t b = 0; b < p.rows; ++b) {
        const float* xb = p.x + b * p.in + r0;
        F16 acc[4] = {load_f(k.out + b * p.out + n), F16{}, F16{}, F16{}};
        for (int j = 0; j < KB; ++j) {
          acc[2 * (j % 2)] += xb[j] * lo[j];
          acc[2 * (j % 2) + 1] += xb[half + j] * hi[j];
        }
        store_f(k.out + b * p.out + n, (acc[0] + acc[1]) + (acc[2] + acc[3]));
      }
    }
  }
}

// Code rows per pass: 8 where whole groups allow it (fewer passes over the sums), else 4, 1.
int64_t rows_per_pass(const Problem& p) {
  const int64_t gsize = p.in / p.groups, code_rows = p.bits == 8 ? p.in : p.in / 2;
  for (int64_t kb : {8, 4})
    if (code_rows % kb == 0 && gsize % kb == 0) return kb;
  return 1;
}

template <int KB>
void run_block_kb(const Problem& p, const Block& k) {
  if (p.bits == 8) {
    if (p.groups > 1) block_int8<KB, true>(p, k); else block_int8<KB, false>(p, k);
  } else {
    if (p.groups > 1) block_int4<KB, true>(p, k); else block_int4<KB, false>(p, k);
  }
}

void run_block(const Problem& p, const Block& k) {
  switch (rows_per_pass(p)) {
    case 8: run_block_kb<8>(p, k); break;
    case 4: run_block_kb<4>(p, k); break;
    default: run_block_kb<1>(p, k); break;
  }
}

inline float code_at(const Problem& p, int64_t k, int64_t n) {
  if (p.bits == 8) return p.q[k * p.out + n];
  const int64_t half = p.in / 2;
  const int32_t c = p.q[(k % half) * p.out + n];
  return static_cast<float>(k < half ? (c << 28) >> 28 : c >> 4);
}

// Columns [n_begin, n_end) one at a time: the few outputs past the last multiple of 16.
void columns_scalar(const Problem& p, int64_t n_begin, int64_t n_end) {
  const int64_t gsize = p.in / p.groups;
  for (int64_t b = 0; b < p.rows; ++b)
    for (int64_t n = n_begin; n < n_end; ++n) {
      float acc = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        float part = 0.f;
        for (int64_t k = g * gsize; k < (g + 1) * gsize; ++k)
          part += p.x[b * p.in + k] * code_at(p, k, n);
        acc += part * p.scale[g * p.out + n];
      }
      p.y[b * p.out + n] = acc;
    }
}

// Tasks claim chunk indices from a counter; the caller claims too and then waits only for
// chunks already claimed, so a task the pool starts late (or never) cannot stall the call.
struct Chunks {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
  std::function<void(int64_t)> body;

  void work() {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void run_parallel(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || count == 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->count = count;
  chunks->body = std::move(body);
  for (int64_t t = 1; t < std::min(threads, count); ++t) pool.Schedule([chunks] { chunks->work(); });
  chunks->work();
  while (chunks->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("lmos qmatmul: x, q and scale must be 2-D");
  Problem p{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(),
            xd[0], xd[1], qd[1], sd[0], bits};
  if (bits != 8 && bits != 4)
    return ffi::Error::InvalidArgument("lmos qmatmul: bits must be 8 or 4");
  const int64_t code_rows = bits == 8 ? p.in : p.in / 2;
  const bool groups_ok = p.groups > 0 && p.in % p.groups == 0 &&
                         (bits == 8 || p.groups == 1 || p.groups % 2 == 0);
  if (qd[0] != code_rows || sd[1] != p.out || !groups_ok || (bits == 4 && p.in % 2))
    return ffi::Error::InvalidArgument("lmos qmatmul: shapes of x, q and scale disagree");

  // Threads split the code rows when the outputs are few (each reads one contiguous stretch
  // of memory and keeps a partial sum: a kernel's 768 to 3072 outputs), the columns when
  // they are many (the LM head's vocabulary: partial sums would not fit the cache).
  const int64_t vec_end = p.out - p.out % 16, threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t kb = rows_per_pass(p), passes = code_rows / kb;
  if (vec_end > 0 && p.out <= 8192 && threads > 1 && passes >= 2 * threads) {
    std::vector<float> partial((threads - 1) * p.rows * p.out);
    run_parallel(pool, threads, [&p, &partial, threads, passes, kb, vec_end](int64_t c) {
      float* out = c == 0 ? p.y : partial.data() + (c - 1) * p.rows * p.out;
      run_block(p, {c * passes / threads * kb, (c + 1) * passes / threads * kb, 0, vec_end, out});
    });
    for (int64_t c = 1; c < threads; ++c)
      for (int64_t b = 0; b < p.rows; ++b) {
        const float* src = partial.data() + ((c - 1) * p.rows + b) * p.out;
        for (int64_t n = 0; n < vec_end; n += 16)
          store_f(p.y + b * p.out + n, load_f(p.y + b * p.out + n) + load_f(src + n));
      }
  } else if (vec_end > 0) {  // column chunks of whole cache lines (64 codes), two per thread
    const int64_t lines = std::max<int64_t>(1, vec_end / 64);
    const int64_t count = std::min<int64_t>(lines, 2 * threads);
    run_parallel(pool, count, [&p, count, lines, vec_end, code_rows](int64_t c) {
      const int64_t n0 = c * lines / count * 64;
      const int64_t n1 = c + 1 == count ? vec_end : (c + 1) * lines / count * 64;
      run_block(p, {0, code_rows, n0, n1, p.y});
    });
  }
  if (p.groups == 1)  // per-channel scale, on the finished sums
    for (int64_t b = 0; b < p.rows; ++b)
      for (int64_t n = 0; n < vec_end; n += 16)
        store_f(p.y + b * p.out + n, load_f(p.y + b * p.out + n) * load_f(p.scale + n));
  columns_scalar(p, vec_end, p.out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmosQMatmulF32, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits"));
