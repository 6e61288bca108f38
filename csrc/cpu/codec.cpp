// kvlayer CPU codec kernels: rotated int8/int4/int2 (rotq.py), KIVI int8/int4/int2 (quant.py), fp8
// (e4m3fn), byte-shuffle.
//
// A plain C ABI loaded with ctypes (kvlayer/codec/_ext.py builds it with g++ on first use), so
// the kernels need neither torch headers nor a matching ABI. Every kernel reproduces the torch
// reference in kvlayer/codec/quant.py and fp8.py bit for bit: the same fp32 operations in the
// same order, round-half-to-even everywhere, no fused multiply-add (build with
// -ffp-contract=off), and c10's own fp16/bf16/fp8 conversion routines. One pass over memory
// per group, single-threaded (callers parallelise over chunks).
//
// Layouts (see quant.py): x is [L, P, T, H, D] contiguous, C = H * D. K (plane 0 when P == 2)
// is grouped per channel over gk tokens: meta [L, nkg, C]. V (plane P-1) is grouped per token
// over gv channels of each head: meta [L, T, H, nvg]. Codes [L, P, T, row_bytes], low bits first.
// Meta dtype: fp16 when x is fp16, fp32 otherwise.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

enum DType : int { F16 = 0, BF16 = 1, F32 = 2 };

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- fp16 (c10::detail::fp16_ieee_{to,from}_fp32_value; F16C gives identical results)
inline float h2f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = u2f(0x7800000u);  // 0x1.0p-112f
  const float normalized = u2f((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = u2f((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t cutoff = 1u << 27;
  return u2f(sign | (two_w < cutoff ? f2u(denormalized) : f2u(normalized)));
#endif
}

inline uint16_t f2h(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  const float scale_to_inf = u2f(239u << 23);
  const float scale_to_zero = u2f(17u << 23);
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

// ---- bf16 (c10::detail::round_to_nearest_even)
inline float b2f(uint16_t b) { return u2f((uint32_t)b << 16); }
inline uint16_t f2b(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = f2u(f);
  return (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// ---- fp8 e4m3fn (c10::detail::fp8e4m3fn_from_fp32_value: RNE, saturating, NaN -> 0x7f)
inline uint8_t f2e4m3(float f) {
  const uint32_t fp8_max = 1087u << 20;
  const uint32_t denorm_mask = 141u << 23;
  uint32_t f_bits = f2u(f);
  uint8_t result;
  const uint32_t sign = f_bits & 0x80000000u;
  f_bits ^= sign;
  if (f_bits >= fp8_max) {
    result = f_bits > 0x7F800000u ? 0x7f : 0x7e;
  } else if (f_bits < (121u << 23)) {
    f_bits = f2u(u2f(f_bits) + u2f(denorm_mask));
    result = (uint8_t)(f_bits - denorm_mask);
  } else {
    const uint8_t mant_odd = (f_bits >> 20) & 1;
    f_bits += ((uint32_t)(7 - 127) << 23) + 0x7FFFF;
    f_bits += mant_odd;
    result = (uint8_t)(f_bits >> 20);
    if (result == 0x7f) result = 0x7e;
  }
  return result | (uint8_t)(sign >> 24);
}

struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int c = 0; c < 256; ++c) {
      const int e = (c >> 3) & 15, m = c & 7;
      float a;
      if (e == 15 && m == 7)
        a = NAN;
      else if (e == 0)
        a = std::ldexp((float)m, -9);
      else
        a = std::ldexp(1.0f + (float)m / 8.0f, e - 7);
      v[c] = (c & 0x80) ? -a : a;
    }
  }
};
const E4M3Table kE4M3;

// The canonical quiet NaN (torch writes float("nan") as this): every NaN the kernels store is
// this one, so both backends produce identical bytes even for non-finite input.
const float kNaN = u2f(0x7FC00000u);
inline float canon(float v) { return v != v ? kNaN : v; }

// ---- rows of any dtype <-> fp32
void load_row(const void* base, int dt, size_t off, float* dst, int n) {
  if (dt == F32) {
    std::memcpy(dst, (const float*)base + off, sizeof(float) * n);
  } else if (dt == F16) {
    const uint16_t* s = (const uint16_t*)base + off;
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
#endif
    for (; i < n; ++i) dst[i] = h2f(s[i]);
  } else {
    const uint16_t* s = (const uint16_t*)base + off;
    for (int i = 0; i < n; ++i) dst[i] = b2f(s[i]);
  }
}

// The encoder reads each chunk once, row by row, usually from DRAM (the engine wrote it a while
// ago): asking for the row kPrefetchRows ahead hides the misses the hardware prefetcher leaves
// (+13% encode on SmolLM2 chunks). A prefetch never faults, so rows past the end are harmless.
constexpr int kPrefetchRows = 16;
inline void prefetch_row(const void* base, int dt, size_t off, int n) {
  const size_t es = dt == F32 ? 4 : 2;
  const char* p = (const char*)base + off * es;
  for (size_t b = 0; b < (size_t)n * es; b += 64) __builtin_prefetch(p + b, 0, 3);
}

void store_row(const float* src, int dt, void* base, size_t off, int n) {
  if (dt == F32) {
    std::memcpy((float*)base + off, src, sizeof(float) * n);
  } else if (dt == F16) {
    uint16_t* d = (uint16_t*)base + off;
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128((__m128i*)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) d[i] = f2h(src[i]);
  } else {
    uint16_t* d = (uint16_t*)base + off;
    for (int i = 0; i < n; ++i) {
      const uint32_t u = f2u(src[i]);
      const uint16_t r = (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
      d[i] = (src[i] != src[i]) ? (uint16_t)0x7FC0 : r;
    }
  }
}

// ---- group parameters (quant.py::_group_params)
struct Meta {
  bool half;
  void* scale;
  void* zero;
  void put(size_t i, float mn, float mx, float qmax, float* z, float* inv, float* s_out) const {
    float zf, sf;
    if (half) {
      const uint16_t zh = f2h(mn);
      zf = h2f(zh);
      const float s = (mx - zf) / qmax;
      uint16_t sh = f2h(s);
      if (h2f(sh) < s) sh = (uint16_t)(sh + 1);  // round the scale up: q * s covers mx
      sf = h2f(sh);
      ((uint16_t*)zero)[i] = zf != zf ? (uint16_t)0x7E00 : zh;
      ((uint16_t*)scale)[i] = sf != sf ? (uint16_t)0x7E00 : sh;
    } else {
      zf = mn;
      sf = (mx - zf) / qmax;
      ((float*)zero)[i] = canon(zf);
      ((float*)scale)[i] = canon(sf);
    }
    *z = zf;
    *inv = sf > 0.0f ? 1.0f / sf : 0.0f;
    if (s_out) *s_out = sf;
  }
  float get_s(size_t i) const { return half ? h2f(((const uint16_t*)scale)[i]) : ((const float*)scale)[i]; }
  float get_z(size_t i) const { return half ? h2f(((const uint16_t*)zero)[i]) : ((const float*)zero)[i]; }
};

#if defined(__AVX__)
inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#endif

// min and max of p[0..n) (n >= 1), both NaN if any element is NaN (torch.amin/amax semantics).
// Branch-free and vectorised: the order of ties between -0 and +0 is unspecified, which is why
// both implementations add +0.0f to the results (quant.py: ``amin(...) + 0.0``).
inline void minmax(const float* p, int n, float* mn_out, float* mx_out) {
  int i = 0;
  float mn = p[0], mx = p[0];
  bool nan = false;
#if defined(__AVX__)
  if (n >= 8) {
    __m256 vmn = _mm256_loadu_ps(p), vmx = vmn, vnan = _mm256_cmp_ps(vmn, vmn, _CMP_UNORD_Q);
    for (i = 8; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(p + i);
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    mn = hmin8(vmn);
    mx = hmax8(vmx);
    nan = _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; i < n; ++i) {
    const float v = p[i];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  *mn_out = nan ? kNaN : mn + 0.0f;
  *mx_out = nan ? kNaN : mx + 0.0f;
}

// max |p[i]| over n >= 0 elements starting from a (>= 0); NaN if any element is NaN.
inline float absmax(const float* p, int n, float a) {
  int i = 0;
  bool nan = a != a;
#if defined(__AVX__)
  if (n >= 8) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmx = _mm256_set1_ps(nan ? 0.0f : a), vnan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(p + i);
      vmx = _mm256_max_ps(vmx, _mm256_andnot_ps(sign, v));
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    a = hmax8(vmx);
    nan |= _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; i < n; ++i) {
    const float v = std::fabs(p[i]);
    a = v > a ? v : a;
    nan |= v != v;
  }
  return nan ? kNaN : a;
}

// Meta::put for n groups at once (vectorised with F16C/AVX; the same IEEE operations, so the
// results are identical to the scalar path): writes meta[off..off+n) and z/inv[0..n).
void params_batch(const Meta& m, size_t off, const float* mn, const float* mx, int n, float qmax, float* z,
                  float* inv) {
  int i = 0;
#if defined(__F16C__) && defined(__AVX2__)
  const __m256 vq = _mm256_set1_ps(qmax), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  if (m.half) {
    const __m128i cnan = _mm_set1_epi16(0x7E00);
    for (; i + 8 <= n; i += 8) {
      const __m256 a = _mm256_loadu_ps(mn + i), b = _mm256_loadu_ps(mx + i);
      const __m128i zh = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT);
      const __m256 zf = _mm256_cvtph_ps(zh);
      const __m256 sv = _mm256_div_ps(_mm256_sub_ps(b, zf), vq);
      __m128i sh = _mm256_cvtps_ph(sv, _MM_FROUND_TO_NEAREST_INT);
      const __m256 up = _mm256_cmp_ps(_mm256_cvtph_ps(sh), sv, _CMP_LT_OQ);
      const __m256i up32 = _mm256_castps_si256(up);
      sh = _mm_sub_epi16(sh, _mm_packs_epi32(_mm256_castsi256_si128(up32), _mm256_extracti128_si256(up32, 1)));
      const __m256 sf = _mm256_cvtph_ps(sh);
      const __m256i zn = _mm256_castps_si256(_mm256_cmp_ps(zf, zf, _CMP_UNORD_Q));
      const __m256i sn = _mm256_castps_si256(_mm256_cmp_ps(sf, sf, _CMP_UNORD_Q));
      const __m128i zn16 = _mm_packs_epi32(_mm256_castsi256_si128(zn), _mm256_extracti128_si256(zn, 1));
      const __m128i sn16 = _mm_packs_epi32(_mm256_castsi256_si128(sn), _mm256_extracti128_si256(sn, 1));
      _mm_storeu_si128((__m128i*)((uint16_t*)m.zero + off + i), _mm_blendv_epi8(zh, cnan, zn16));
      _mm_storeu_si128((__m128i*)((uint16_t*)m.scale + off + i), _mm_blendv_epi8(sh, cnan, sn16));
      _mm256_storeu_ps(z + i, zf);
      _mm256_storeu_ps(inv + i, _mm256_and_ps(_mm256_div_ps(one, sf), _mm256_cmp_ps(sf, zero, _CMP_GT_OQ)));
    }
  } else {
    const __m256 cnan = _mm256_set1_ps(kNaN);
    for (; i + 8 <= n; i += 8) {
      const __m256 a = _mm256_loadu_ps(mn + i), b = _mm256_loadu_ps(mx + i);
      const __m256 sf = _mm256_div_ps(_mm256_sub_ps(b, a), vq);
      _mm256_storeu_ps((float*)m.zero + off + i, _mm256_blendv_ps(a, cnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
      _mm256_storeu_ps((float*)m.scale + off + i, _mm256_blendv_ps(sf, cnan, _mm256_cmp_ps(sf, sf, _CMP_UNORD_Q)));
      _mm256_storeu_ps(z + i, a);
      _mm256_storeu_ps(inv + i, _mm256_and_ps(_mm256_div_ps(one, sf), _mm256_cmp_ps(sf, zero, _CMP_GT_OQ)));
    }
  }
#endif
  for (; i < n; ++i) m.put(off + i, mn[i], mx[i], qmax, &z[i], &inv[i], nullptr);
}

inline uint8_t quant1(float x, float z, float inv, float qmax) {
  float t = (x - z) * inv;
  t = t > 0.0f ? t : 0.0f;  // NaN -> 0
  t = t < qmax ? t : qmax;
  return (uint8_t)(int)std::nearbyint(t);
}

void pack_row(const uint8_t* q, int n, int bits, uint8_t* out, int row_bytes) {
  if (bits == 8) {
    std::memcpy(out, q, n);
    return;
  }
  const int per = 8 / bits;
  const int full = n / per;
  if (bits == 4) {
    for (int j = 0; j < full; ++j) out[j] = (uint8_t)(q[2 * j] | (q[2 * j + 1] << 4));
  } else {
    for (int j = 0; j < full; ++j)
      out[j] = (uint8_t)(q[4 * j] | (q[4 * j + 1] << 2) | (q[4 * j + 2] << 4) | (q[4 * j + 3] << 6));
  }
  for (int j = full; j < row_bytes; ++j) {
    uint8_t b = 0;
    for (int i = 0; i < per; ++i) {
      const int c = j * per + i;
      if (c < n) b |= (uint8_t)(q[c] << (bits * i));
    }
    out[j] = b;
  }
}

void unpack_row(const uint8_t* p, int n, int bits, float* q) {
  if (bits == 8) {
    for (int c = 0; c < n; ++c) q[c] = (float)p[c];
    return;
  }
  const int per = 8 / bits;
  const int mask = (1 << bits) - 1;
  const int full = n / per;
  if (bits == 4) {
    for (int j = 0; j < full; ++j) {
      q[2 * j] = (float)(p[j] & 15);
      q[2 * j + 1] = (float)(p[j] >> 4);
    }
  } else {
    for (int j = 0; j < full; ++j) {
      q[4 * j] = (float)(p[j] & 3);
      q[4 * j + 1] = (float)((p[j] >> 2) & 3);
      q[4 * j + 2] = (float)((p[j] >> 4) & 3);
      q[4 * j + 3] = (float)(p[j] >> 6);
    }
  }
  for (int c = full * per; c < n; ++c) q[c] = (float)((p[c / per] >> (bits * (c % per))) & mask);
}


// ---- rotated quantization (rotq.py) -------------------------------------------------------------

constexpr float kF32Max = 3.4028234663852886e38f;

inline bool finite(float v) { return std::fabs(v) <= kF32Max; }

inline uint8_t rint_code(float t, float qmax) {
  t = t > 0.0f ? t : 0.0f;  // NaN -> 0
  t = t < qmax ? t : qmax;
  return (uint8_t)(int)std::nearbyint(t);
}

#if defined(__AVX2__)
// Butterflies h = 1, 2, 4 inside one vector of 8: (a + b, a - b) computed as b + (a ^ sign) and
// a + (-b): the same IEEE results (addition commutes, a - b == a + (-b)).
__attribute__((always_inline)) inline __m256 bfly8(__m256 x) {
  const __m256 s1 = _mm256_setr_ps(0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f);
  const __m256 s2 = _mm256_setr_ps(0.0f, 0.0f, -0.0f, -0.0f, 0.0f, 0.0f, -0.0f, -0.0f);
  const __m256 s4 = _mm256_setr_ps(0.0f, 0.0f, 0.0f, 0.0f, -0.0f, -0.0f, -0.0f, -0.0f);
  x = _mm256_add_ps(_mm256_permute_ps(x, 0xB1), _mm256_xor_ps(x, s1));
  x = _mm256_add_ps(_mm256_permute_ps(x, 0x4E), _mm256_xor_ps(x, s2));
  return _mm256_add_ps(_mm256_permute2f128_ps(x, x, 1), _mm256_xor_ps(x, s4));
}

// One head of NV vectors (D = 8 NV) in registers: stages h = 8 .. D/2 across vectors, then * c.
template <int NV>
__attribute__((always_inline)) inline void fwht_reg(float* v, float c) {
  __m256 r[NV];
  for (int k = 0; k < NV; ++k) r[k] = bfly8(_mm256_loadu_ps(v + 8 * k));
  for (int hv = 1; hv < NV; hv *= 2)
    for (int i = 0; i < NV; i += 2 * hv)
      for (int j = i; j < i + hv; ++j) {
        const __m256 a = r[j], b = r[j + hv];
        r[j] = _mm256_add_ps(a, b);
        r[j + hv] = _mm256_sub_ps(a, b);
      }
  const __m256 vc = _mm256_set1_ps(c);
  for (int k = 0; k < NV; ++k) _mm256_storeu_ps(v + 8 * k, _mm256_mul_ps(r[k], vc));
}
#endif

#if defined(__AVX512F__)
// The signs of bfly16's four stages, built once per kernel call and passed in: rebuilt at every
// vector (as inlining them into a large loop left them) they cost ~2.5 instructions per vector.
struct Bfly16 {
  __m512 s1, s2, s4, s8;
  Bfly16() {
    const __m512 one = _mm512_set1_ps(1.0f), mone = _mm512_set1_ps(-1.0f);
    s1 = _mm512_mask_blend_ps(0xAAAA, one, mone);
    s2 = _mm512_mask_blend_ps(0xCCCC, one, mone);
    s4 = _mm512_mask_blend_ps(0xF0F0, one, mone);
    s8 = _mm512_mask_blend_ps(0xFF00, one, mone);
  }
};

// The same butterflies h = 1, 2, 4, 8 inside one vector of 16.
__attribute__((always_inline)) inline __m512 bfly16(__m512 x, const Bfly16& b) {
  // Each stage: partner p = permute(x); lanes whose bit h is clear get x + p (a + b), the others
  // p - x (a - b), as one fused x * (+-1) + p: the product is exact, so the single rounding is
  // that of the add (IEEE addition commutes), the same result as the separate operations.
  x = _mm512_fmadd_ps(x, b.s1, _mm512_permute_ps(x, 0xB1));
  x = _mm512_fmadd_ps(x, b.s2, _mm512_permute_ps(x, 0x4E));
  x = _mm512_fmadd_ps(x, b.s4, _mm512_shuffle_f32x4(x, x, 0xB1));
  return _mm512_fmadd_ps(x, b.s8, _mm512_shuffle_f32x4(x, x, 0x4E));
}

template <int NV>
__attribute__((always_inline)) inline void fwht_reg16(float* v, float c) {
  __m512 r[NV];
  const Bfly16 b16;
  for (int k = 0; k < NV; ++k) r[k] = bfly16(_mm512_loadu_ps(v + 16 * k), b16);
  for (int hv = 1; hv < NV; hv *= 2)
    for (int i = 0; i < NV; i += 2 * hv)
      for (int j = i; j < i + hv; ++j) {
        const __m512 a = r[j], b = r[j + hv];
        r[j] = _mm512_add_ps(a, b);
        r[j + hv] = _mm512_sub_ps(a, b);
      }
  const __m512 vc = _mm512_set1_ps(c);
  for (int k = 0; k < NV; ++k) _mm512_storeu_ps(v + 16 * k, _mm512_mul_ps(r[k], vc));
}
#endif

// Normalised fast Walsh-Hadamard transform of one head (D a power of two), in place: butterflies
// h = 1, 2, 4, ..., D/2 as (a + b, a - b), then * c, exactly as rotq.fwht.
__attribute__((always_inline)) inline void fwht(float* v, int D, float c) {
#if defined(__AVX512F__)
  switch (D) {
    case 16: fwht_reg16<1>(v, c); return;
    case 32: fwht_reg16<2>(v, c); return;
    case 64: fwht_reg16<4>(v, c); return;
    case 128: fwht_reg16<8>(v, c); return;
    case 256: fwht_reg16<16>(v, c); return;
    default: break;
  }
#endif
#if defined(__AVX2__)
  switch (D) {
    case 8: fwht_reg<1>(v, c); return;
    case 16: fwht_reg<2>(v, c); return;
    case 32: fwht_reg<4>(v, c); return;
    case 64: fwht_reg<8>(v, c); return;
    case 128: fwht_reg<16>(v, c); return;
    default: break;
  }
  if (D >= 8) {
    for (int i = 0; i < D; i += 8) _mm256_storeu_ps(v + i, bfly8(_mm256_loadu_ps(v + i)));
    for (int h = 8; h < D; h *= 2)
      for (int i = 0; i < D; i += 2 * h)
        for (int j = i; j < i + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
          _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, b));
        }
    const __m256 vc = _mm256_set1_ps(c);
    for (int i = 0; i < D; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), vc));
    return;
  }
#endif
  for (int h = 1; h < D; h *= 2)
    for (int i = 0; i < D; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  for (int i = 0; i < D; ++i) v[i] *= c;
}

// Every head of a row; D = 64 (the common head_dim) gets its own loop so the transform inlines.
__attribute__((always_inline)) inline void fwht_row(float* y, int H, int D, float c) {
  if (D == 64) {
    for (int h = 0; h < H; ++h) fwht(y + (size_t)h * 64, 64, c);
  } else {
    for (int h = 0; h < H; ++h) fwht(y + (size_t)h * D, D, c);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define KVL_FAST64 1
// ---- AVX-512 fast path for head_dim 64 and 4/8-bit codes: one head = 4 registers, loaded,
// rotated, quantized or dequantized and stored without leaving them. The same IEEE operations
// as the generic code (and so as rotq.py), in the same order.

// The 64-point transform's constants: bfly16's signs and c.
struct Fw64 {
  Bfly16 b;
  __m512 c;
  explicit Fw64(float cc) : c(_mm512_set1_ps(cc)) {}
};

__attribute__((always_inline)) inline void fwht64_regs(__m512* r, const Fw64& f) {
  for (int k = 0; k < 4; ++k) r[k] = bfly16(r[k], f.b);
  __m512 a = r[0], b = r[1];
  r[0] = _mm512_add_ps(a, b);
  r[1] = _mm512_sub_ps(a, b);
  a = r[2], b = r[3];
  r[2] = _mm512_add_ps(a, b);
  r[3] = _mm512_sub_ps(a, b);
  a = r[0], b = r[2];
  r[0] = _mm512_add_ps(a, b);
  r[2] = _mm512_sub_ps(a, b);
  a = r[1], b = r[3];
  r[1] = _mm512_add_ps(a, b);
  r[3] = _mm512_sub_ps(a, b);
  for (int k = 0; k < 4; ++k) r[k] = _mm512_mul_ps(r[k], f.c);
}

// 16 elements of a row of dtype dt as fp32 (exact).
__attribute__((always_inline)) inline __m512 load16(const void* base, int dt, size_t off) {
  if (dt == F32) return _mm512_loadu_ps((const float*)base + off);
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + off));
  if (dt == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// NaN -> the canonical NaN (unless the caller knows there is none), then stored as dtype dt
// (RNE; store_row's conversions).
__attribute__((always_inline)) inline void store16(__m512 y, int dt, void* base, size_t off, bool canon = true) {
  if (canon) y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), y, _mm512_set1_ps(kNaN));
  if (dt == F32) {
    _mm512_storeu_ps((float*)base + off, y);
  } else if (dt == F16) {
    _mm256_storeu_si256((__m256i*)((uint16_t*)base + off), _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                             _mm512_set1_epi32(0x7FFF))),
        16);
    _mm256_storeu_si256((__m256i*)((uint16_t*)base + off), _mm512_cvtepi32_epi16(r));
  }
}

// Codes c0 .. c0 + 15 (c0 a multiple of 16) of a packed row as fp32.
__attribute__((always_inline)) inline __m512 codes16(const uint8_t* p, int bits, int c0) {
  __m128i b;
  if (bits == 8) {
    b = _mm_loadu_si128((const __m128i*)(p + c0));
  } else {  // byte i (codes 2i | 2i+1 << 4) into 64-bit lane i; its nibbles to its two 32-bit halves
    const __m512i x = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)(p + c0 / 2)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_or_si512(x, _mm512_slli_epi64(x, 28)),
                                               _mm512_set1_epi64(0x0000000F0000000FLL)));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

// t = clamp(t, 0, qmax) rounded to nearest even (quant1's tail), stored as codes c0 .. c0 + 15.
__attribute__((always_inline)) inline void put16(__m512 t, float qmax, int bits, uint8_t* p, int c0) {
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_setzero_ps()), _mm512_set1_ps(qmax));
  const __m512i q = _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (bits == 8) {
    _mm_storeu_si128((__m128i*)(p + c0), _mm512_cvtepi32_epi8(q));
  } else {  // each 64-bit lane's low byte: code 2i | code 2i+1 << 4
    _mm_storel_epi64((__m128i*)(p + c0 / 2), _mm512_cvtepi64_epi8(_mm512_or_si512(q, _mm512_srli_epi64(q, 28))));
  }
}
#endif

// quant1 over a row, vectorised: max_ps(t, 0) and min_ps(t, qmax) are exactly the scalar
// ternaries (NaN -> 0 included), round_ps is nearbyint. sym: t = y * inv + half (values), else
// t = (y - z) * inv (keys).
template <bool sym>
inline void quant_row(const float* y, const float* z, const float* inv, float half, float qmax, uint8_t* q, int n) {
  int i = 0;
#if defined(__AVX2__)
  const __m256 vq = _mm256_set1_ps(qmax), zero = _mm256_setzero_ps(), vh = _mm256_set1_ps(half);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= n; i += 32) {
    __m256i r[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 yy = _mm256_loadu_ps(y + i + 8 * k), ii = _mm256_loadu_ps(inv + i + 8 * k);
      __m256 t = sym ? _mm256_add_ps(_mm256_mul_ps(yy, ii), vh)
                     : _mm256_mul_ps(_mm256_sub_ps(yy, _mm256_loadu_ps(z + i + 8 * k)), ii);
      t = _mm256_min_ps(_mm256_max_ps(t, zero), vq);
      r[k] = _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(r[0], r[1]), _mm256_packus_epi32(r[2], r[3]));
    _mm256_storeu_si256((__m256i*)(q + i), _mm256_permutevar8x32_epi32(b, perm));
  }
#endif
  for (; i < n; ++i) q[i] = sym ? rint_code(y[i] * inv[i] + half, qmax) : quant1(y[i], z[i], inv[i], qmax);
}

// unpack_row, vectorised for 8 and 4 bits.
inline void unpack_fast(const uint8_t* p, int n, int bits, float* q) {
  int c = 0;
#if defined(__AVX2__)
  if (bits == 8) {
    for (; c + 8 <= n; c += 8)
      _mm256_storeu_ps(q + c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + c)))));
  } else if (bits == 4) {
    const __m128i m = _mm_set1_epi8(0x0F);
    for (; c + 16 <= n; c += 16) {
      const __m128i b = _mm_loadl_epi64((const __m128i*)(p + c / 2));
      const __m128i x = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
      _mm256_storeu_ps(q + c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)));
      _mm256_storeu_ps(q + c + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))));
    }
  }
#endif
  const int per = 8 / bits, mask = (1 << bits) - 1;
  for (; c < n; ++c) q[c] = (float)((p[c / per] >> (bits * (c % per))) & mask);
}

// Largest |p[i]| of n >= 0 elements (0 for none) and whether all are finite; max is exact in any
// order, and max_ps(v, a) keeps a for a NaN v as the scalar ternary does.
inline float absmax_fin(const float* p, int n, bool* fin) {
  int i = 0;
  float a = 0.0f;
  bool f = true;
#if defined(__AVX__)
  if (n >= 8) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(kF32Max);
    __m256 va = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(p + i));
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(v, big, _CMP_LE_OQ));
      va = _mm256_max_ps(v, va);
    }
    a = hmax8(va);
    f = _mm256_movemask_ps(ok) == 0xFF;
  }
#endif
  for (; i < n; ++i) {
    const float v = std::fabs(p[i]);
    f &= v <= kF32Max;
    a = v > a ? v : a;
  }
  *fin = f;
  return a;
}

// V scales (rotq.py): floats with 5 mantissa bits within 8 octaves below the (layer, head)'s top
// scale (its largest needed scale rounded up to 5 mantissa bits): code = e << 5 | m stands for
// 2^(E_top - e) * (1 + m / 32). The code of a group is that of its needed scale rounded up (the
// smallest such float >= need): integer operations on the float bits, exact and table-free.
constexpr uint32_t kScaleDrop = 18;  // mantissa bits dropped (23 - 5)
inline uint32_t round_up_bits(uint32_t u) { return (u + ((1u << kScaleDrop) - 1)) & ~((1u << kScaleDrop) - 1); }

inline float scale_top(float S) { return S != S ? kNaN : u2f(round_up_bits(f2u(S))); }

inline int scale_code(float top, float need) {
  const int eu = (int)(f2u(top) >> 23);
  if (eu == 0) return 0;
  const int emax = eu - 1 < 7 ? eu - 1 : 7;
  if (!(need > 0.0f)) return emax << 5;
  const uint32_t v = round_up_bits(f2u(need));
  const int e = eu - (int)(v >> 23);
  return e > emax ? emax << 5 : (e << 5) | (int)((v >> kScaleDrop) & 31);
}

inline float scale_of(float top, int code) {
  if (top != top) return kNaN;
  const uint32_t eu = f2u(top) >> 23;
  if (eu == 0) return 0.0f;
  return u2f(((eu - (uint32_t)(code >> 5)) << 23) | ((uint32_t)(code & 31) << kScaleDrop));
}

// Group codes (lo, hi) and the resulting (mn, inv) of the key channels [c0, c1) of one token group,
// per rotq._quantize_k; kb = this layer's bases (min row, then max row).
inline void k_group_codes(const float* kb, int C, const float* gmn, const float* gmx, bool empty, float qmax,
                          uint8_t* lo_out, uint8_t* hi_out, float* mn, float* inv) {
  int cc = 0;
#if defined(__AVX2__)
  const __m256 v255 = _mm256_set1_ps(255.0f), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 vq = _mm256_set1_ps(qmax), vlive0 = empty ? zero : _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (; cc + 8 <= C; cc += 8) {
    const __m256 bmin = _mm256_loadu_ps(kb + cc), bmax = _mm256_loadu_ps(kb + C + cc);
    const __m256 step = _mm256_div_ps(_mm256_sub_ps(bmax, bmin), v255);
    const __m256 live = _mm256_and_ps(_mm256_cmp_ps(step, zero, _CMP_GT_OQ), vlive0);
    const __m256 st = _mm256_blendv_ps(one, step, live);
    const __m256 a = _mm256_loadu_ps(gmn + cc), b = _mm256_loadu_ps(gmx + cc);
    __m256 t = _mm256_div_ps(_mm256_sub_ps(a, bmin), st);
    t = _mm256_blendv_ps(t, zero, _mm256_cmp_ps(t, zero, _CMP_LT_OQ));
    t = _mm256_blendv_ps(t, v255, _mm256_cmp_ps(t, v255, _CMP_GT_OQ));
    __m256 lo = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256 dec = _mm256_and_ps(_mm256_cmp_ps(lo, zero, _CMP_GT_OQ),
                               _mm256_cmp_ps(_mm256_add_ps(bmin, _mm256_mul_ps(lo, st)), a, _CMP_GT_OQ));
    lo = _mm256_sub_ps(lo, _mm256_and_ps(dec, one));
    t = _mm256_div_ps(_mm256_sub_ps(b, bmin), st);
    t = _mm256_blendv_ps(t, zero, _mm256_cmp_ps(t, zero, _CMP_LT_OQ));
    t = _mm256_blendv_ps(t, v255, _mm256_cmp_ps(t, v255, _CMP_GT_OQ));
    __m256 hi = _mm256_round_ps(t, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __m256 inc = _mm256_and_ps(_mm256_cmp_ps(hi, v255, _CMP_LT_OQ),
                                     _mm256_cmp_ps(_mm256_add_ps(bmin, _mm256_mul_ps(hi, st)), b, _CMP_LT_OQ));
    hi = _mm256_add_ps(hi, _mm256_and_ps(inc, one));
    lo = _mm256_and_ps(lo, live);
    hi = _mm256_and_ps(hi, live);
    const __m256i li = _mm256_cvttps_epi32(lo), hiI = _mm256_cvttps_epi32(hi);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i pk = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(_mm256_packus_epi32(li, hiI), _mm256_setzero_si256()), perm);
    alignas(32) uint8_t tmp[32];
    _mm256_store_si256((__m256i*)tmp, pk);
    std::memcpy(lo_out + cc, tmp, 8);
    std::memcpy(hi_out + cc, tmp + 8, 8);
    const __m256 m0 = _mm256_add_ps(bmin, _mm256_mul_ps(lo, step));
    const __m256 m1 = _mm256_add_ps(bmin, _mm256_mul_ps(hi, step));
    const __m256 sc = _mm256_div_ps(_mm256_sub_ps(m1, m0), vq);
    _mm256_storeu_ps(mn + cc, m0);
    _mm256_storeu_ps(inv + cc, _mm256_and_ps(_mm256_div_ps(one, sc), _mm256_cmp_ps(sc, zero, _CMP_GT_OQ)));
  }
#endif
  for (; cc < C; ++cc) {
    const float bmin = kb[cc], bmax = kb[C + cc];
    const float step = (bmax - bmin) / 255.0f;
    float lo = 0.0f, hi = 0.0f;
    if (step > 0.0f && !empty) {
      const float a = gmn[cc], b = gmx[cc];
      float t = (a - bmin) / step;
      t = t < 0.0f ? 0.0f : (t > 255.0f ? 255.0f : t);
      lo = std::floor(t);
      if (lo > 0.0f && bmin + lo * step > a) lo -= 1.0f;
      t = (b - bmin) / step;
      t = t < 0.0f ? 0.0f : (t > 255.0f ? 255.0f : t);
      hi = std::ceil(t);
      if (hi < 255.0f && bmin + hi * step < b) hi += 1.0f;
    }
    lo_out[cc] = (uint8_t)(int)lo;
    hi_out[cc] = (uint8_t)(int)hi;
    const float m0 = bmin + lo * step, m1 = bmin + hi * step;
    const float sc = (m1 - m0) / qmax;
    mn[cc] = m0;
    inv[cc] = sc > 0.0f ? 1.0f / sc : 0.0f;
  }
}
}  // namespace

// RoPE by each token's in-chunk offset on one key row of H heads (rotq.rope_keys, the same IEEE
// operations in the same order): pairs (a, b) = (x[j], x[j + D/2]) with the row's cos/sin ``cs``/``sn``
// (D/2 each); UNDO: (a*c + b*s, b*c - a*s), else (a*c - b*s, b*c + a*s).
template <bool UNDO>
__attribute__((always_inline)) inline void rope_row(float* r, int H, int D, const float* cs, const float* sn) {
  const int h2 = D / 2;
  for (int h = 0; h < H; ++h) {
    float* x = r + (size_t)h * D;
    for (int j = 0; j < h2; ++j) {
      const float a = x[j], b = x[j + h2], c = cs[j], s = sn[j];
      if (UNDO) {
        x[j] = a * c + b * s;
        x[j + h2] = b * c - a * s;
      } else {
        x[j] = a * c - b * s;
        x[j + h2] = b * c + a * s;
      }
    }
  }
}

#if defined(KVL_FAST64)
// The same on one head of 64 held in 4 registers: v[0..1] are a, v[2..3] are b.
template <bool UNDO>
__attribute__((always_inline)) inline void rope64_regs(__m512* v, const float* cs, const float* sn) {
  for (int k = 0; k < 2; ++k) {
    const __m512 c = _mm512_loadu_ps(cs + 16 * k), s = _mm512_loadu_ps(sn + 16 * k);
    const __m512 a = v[k], b = v[k + 2];
    if (UNDO) {
      v[k] = _mm512_add_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s));
      v[k + 2] = _mm512_sub_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s));
    } else {
      v[k] = _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s));
      v[k + 2] = _mm512_add_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s));
    }
  }
}
#endif

#if defined(KVL_FAST64)
// Decoder rows of the fast path (head_dim 64, 4/8-bit codes), specialised on the bits, the
// dtype and RoPE so that the loops hold no per-vector branches; the operations and their order
// are the generic path's.

// Key rows t0 .. t1 - 1 of one token group: q * s + z, the transform, RoPE put back, dtype.
template <int BITS, int DT, bool ROPE>
__attribute__((noinline)) void dec_krows(const uint8_t* codes, int rb, int t0, int t1, const float* s, const float* z, int H,
                                         bool rot, const Fw64& fw, const float* cs, const float* sn, void* out,
                                         size_t plane, bool canon) {
  const int C = H * 64;
  for (int t = t0; t < t1; ++t) {
    const uint8_t* row = codes + (size_t)t * rb;
    for (int h = 0; h < H; ++h) {
      __m512 v[4];
      for (int k = 0; k < 4; ++k) {
        const int cc = h * 64 + 16 * k;
        v[k] = _mm512_add_ps(_mm512_mul_ps(codes16(row, BITS, cc), _mm512_loadu_ps(s + cc)), _mm512_loadu_ps(z + cc));
      }
      if (rot) fwht64_regs(v, fw);
      if (ROPE) rope64_regs<false>(v, cs + (size_t)t * 32, sn + (size_t)t * 32);
      for (int k = 0; k < 4; ++k) store16(v[k], DT, out, plane + (size_t)t * C + h * 64 + 16 * k, canon);
    }
  }
}

// The value rows of one layer, one scale per 16 channels (gv a multiple of 16).
template <int BITS, int DT>
__attribute__((noinline)) void dec_vrows(const uint8_t* codes, int rb, const uint8_t* vcodes, const float* top, int T, int H,
                                         int nvg, int gv, bool rot, const Fw64& fw, void* out, size_t plane, bool canon,
                                         float* gs) {
  const int C = H * 64, ng = H * nvg;
  const __m512 vh = _mm512_set1_ps(BITS == 4 ? 7.5f : 127.5f);
  for (int t = 0; t < T; ++t) {
    const uint8_t* vc = vcodes + (size_t)t * ng;
    for (int h = 0; h < H; ++h)
      for (int g = 0; g < nvg; ++g) gs[h * nvg + g] = scale_of(top[h], vc[h * nvg + g]);
    const uint8_t* row = codes + (size_t)t * rb;
    for (int h = 0; h < H; ++h) {
      __m512 v[4];
      for (int k = 0; k < 4; ++k) {
        const int cc = h * 64 + 16 * k;
        v[k] = _mm512_mul_ps(_mm512_sub_ps(codes16(row, BITS, cc), vh), _mm512_set1_ps(gs[h * nvg + 16 * k / gv]));
      }
      if (rot) fwht64_regs(v, fw);
      for (int k = 0; k < 4; ++k) store16(v[k], DT, out, plane + (size_t)t * C + h * 64 + 16 * k, canon);
    }
  }
}

template <int BITS>
void dec_krows_dt(int dt, bool rope, const uint8_t* codes, int rb, int t0, int t1, const float* s, const float* z, int H,
                  bool rot, const Fw64& fw, const float* cs, const float* sn, void* out, size_t plane, bool canon) {
#define KVL_K(D, R) dec_krows<BITS, D, R>(codes, rb, t0, t1, s, z, H, rot, fw, cs, sn, out, plane, canon)
  if (dt == F16) { if (rope) KVL_K(F16, true); else KVL_K(F16, false); }
  else if (dt == BF16) { if (rope) KVL_K(BF16, true); else KVL_K(BF16, false); }
  else { if (rope) KVL_K(F32, true); else KVL_K(F32, false); }
#undef KVL_K
}

template <int BITS>
void dec_vrows_dt(int dt, const uint8_t* codes, int rb, const uint8_t* vcodes, const float* top, int T, int H, int nvg, int gv,
                  bool rot, const Fw64& fw, void* out, size_t plane, bool canon, float* gs) {
  if (dt == F16) dec_vrows<BITS, F16>(codes, rb, vcodes, top, T, H, nvg, gv, rot, fw, out, plane, canon, gs);
  else if (dt == BF16) dec_vrows<BITS, BF16>(codes, rb, vcodes, top, T, H, nvg, gv, rot, fw, out, plane, canon, gs);
  else dec_vrows<BITS, F32>(codes, rb, vcodes, top, T, H, nvg, gv, rot, fw, out, plane, canon, gs);
}
#endif

extern "C" {

int kvl_abi_version(void) { return 2; }

// Quantize a [L, P, T, H, D] chunk (P = 2: K then V; P = 1: values only). Returns 0 on success.
int kvl_quantize(const void* x, int dt, int L, int P, int T, int H, int D, int bits, int gk, int gv,
                 void* k_scale, void* k_zero, void* v_scale, void* v_zero, uint8_t* codes) {
  if ((bits != 2 && bits != 4 && bits != 8) || gk < 1 || gv < 1 || (P != 1 && P != 2)) return 1;
  const int C = H * D;
  if (L == 0 || T == 0 || C == 0) return 0;
  const int rb = (C * bits + 7) / 8;
  const float qmax = (float)((1 << bits) - 1);
  const int nkg = (T + gk - 1) / gk;
  const int nvg = (D + gv - 1) / gv;
  const bool half = dt == F16;
  const int TB = 16;
  std::vector<float> row(C), mn(C), mx(C), z(C), inv(C), vrows((size_t)TB * C);
  std::vector<float> gmn((size_t)TB * H * nvg), gmx(gmn.size()), gz(gmn.size()), ginv(gmn.size());
  std::vector<uint8_t> q(C), bad(C);
  for (int l = 0; l < L; ++l) {
    if (P == 2) {
      const size_t plane = (size_t)l * P * T * C;
      const Meta m{half, k_scale, k_zero};
      for (int g = 0; g < nkg; ++g) {
        const int t0 = g * gk, t1 = t0 + gk < T ? t0 + gk : T;
        load_row(x, dt, plane + (size_t)t0 * C, mn.data(), C);
        std::memcpy(mx.data(), mn.data(), sizeof(float) * C);
        for (int c = 0; c < C; ++c) bad[c] = mn[c] != mn[c];
        for (int t = t0 + 1; t < t1; ++t) {
          load_row(x, dt, plane + (size_t)t * C, row.data(), C);
          float* __restrict a = mn.data();
          float* __restrict b = mx.data();
          uint8_t* __restrict n = bad.data();
          const float* __restrict r = row.data();
          for (int c = 0; c < C; ++c) {  // branch-free, vectorised; NaN tracked on the side
            a[c] = r[c] < a[c] ? r[c] : a[c];
            b[c] = r[c] > b[c] ? r[c] : b[c];
            n[c] |= r[c] != r[c];
          }
        }
        for (int c = 0; c < C; ++c) {
          mn[c] = bad[c] ? kNaN : mn[c] + 0.0f;
          mx[c] = bad[c] ? kNaN : mx[c] + 0.0f;
        }
        params_batch(m, ((size_t)l * nkg + g) * C, mn.data(), mx.data(), C, qmax, z.data(), inv.data());
        for (int t = t0; t < t1; ++t) {
          load_row(x, dt, plane + (size_t)t * C, row.data(), C);
          for (int c = 0; c < C; ++c) q[c] = quant1(row[c], z[c], inv[c], qmax);
          pack_row(q.data(), C, bits, codes + (((size_t)l * P) * T + t) * rb, rb);
        }
      }
    }
    // V: blocks of TB tokens, so the group parameters of a block are computed in one vector pass
    // (V meta of consecutive tokens is contiguous).
    const size_t plane = ((size_t)l * P + (P - 1)) * T * C;
    const Meta m{half, v_scale, v_zero};
    const int ng = H * nvg;
    for (int t0 = 0; t0 < T; t0 += TB) {
      const int nt = T - t0 < TB ? T - t0 : TB;
      for (int r = 0; r < nt; ++r) {
        float* rp = vrows.data() + (size_t)r * C;
        load_row(x, dt, plane + (size_t)(t0 + r) * C, rp, C);
        for (int h = 0; h < H; ++h)
          for (int g = 0; g < nvg; ++g) {
            const int c0 = h * D + g * gv;
            const int c1 = g * gv + gv < D ? c0 + gv : h * D + D;
            const int gi = r * ng + h * nvg + g;
            minmax(rp + c0, c1 - c0, &gmn[gi], &gmx[gi]);
          }
      }
      params_batch(m, ((size_t)l * T + t0) * ng, gmn.data(), gmx.data(), nt * ng, qmax, gz.data(), ginv.data());
      for (int r = 0; r < nt; ++r) {
        const float* rp = vrows.data() + (size_t)r * C;
        for (int h = 0; h < H; ++h)
          for (int g = 0; g < nvg; ++g) {
            const int c0 = h * D + g * gv;
            const int c1 = g * gv + gv < D ? c0 + gv : h * D + D;
            const float zz = gz[r * ng + h * nvg + g], ii = ginv[r * ng + h * nvg + g];
            for (int c = c0; c < c1; ++c) q[c] = quant1(rp[c], zz, ii, qmax);
          }
        pack_row(q.data(), C, bits, codes + (((size_t)l * P + (P - 1)) * T + t0 + r) * rb, rb);
      }
    }
  }
  return 0;
}

// Dequantize into out ([L, P, T, H, D] of dtype dt). Returns 0 on success.
int kvl_dequantize(const void* k_scale, const void* k_zero, const void* v_scale, const void* v_zero,
                   const uint8_t* codes, int dt, int L, int P, int T, int H, int D, int bits, int gk, int gv,
                   void* out) {
  if ((bits != 2 && bits != 4 && bits != 8) || gk < 1 || gv < 1 || (P != 1 && P != 2)) return 1;
  const int C = H * D;
  if (L == 0 || T == 0 || C == 0) return 0;
  const int rb = (C * bits + 7) / 8;
  const int nkg = (T + gk - 1) / gk;
  const int nvg = (D + gv - 1) / gv;
  const bool half = dt == F16;
  std::vector<float> q(C), y(C), s(C), z(C);
  for (int l = 0; l < L; ++l) {
    if (P == 2) {
      const Meta m{half, (void*)k_scale, (void*)k_zero};
      const size_t plane = (size_t)l * P * T * C;
      for (int g = 0; g < nkg; ++g) {
        const size_t mi = ((size_t)l * nkg + g) * C;
        for (int c = 0; c < C; ++c) {
          s[c] = m.get_s(mi + c);
          z[c] = m.get_z(mi + c);
        }
        const int t0 = g * gk, t1 = t0 + gk < T ? t0 + gk : T;
        for (int t = t0; t < t1; ++t) {
          unpack_row(codes + (((size_t)l * P) * T + t) * rb, C, bits, q.data());
          for (int c = 0; c < C; ++c) y[c] = canon(q[c] * s[c] + z[c]);
          store_row(y.data(), dt, out, plane + (size_t)t * C, C);
        }
      }
    }
    const Meta m{half, (void*)v_scale, (void*)v_zero};
    const size_t plane = ((size_t)l * P + (P - 1)) * T * C;
    for (int t = 0; t < T; ++t) {
      unpack_row(codes + (((size_t)l * P + (P - 1)) * T + t) * rb, C, bits, q.data());
      for (int h = 0; h < H; ++h) {
        for (int g = 0; g < nvg; ++g) {
          const size_t mi = (((size_t)l * T + t) * H + h) * nvg + g;
          const float ss = m.get_s(mi), zz = m.get_z(mi);
          const int c0 = h * D + g * gv;
          const int c1 = g * gv + gv < D ? c0 + gv : h * D + D;
          for (int c = c0; c < c1; ++c) y[c] = canon(q[c] * ss + zz);
        }
      }
      store_row(y.data(), dt, out, plane + (size_t)t * C, C);
    }
  }
  return 0;
}

// fp8 e4m3fn with one fp32 scale per (layer, plane, head): scales [L, P, H], codes [L, P, T, H, D].
int kvl_fp8_encode(const void* x, int dt, int L, int P, int T, int H, int D, float* scales, uint8_t* codes) {
  const int C = H * D;
  const size_t nlp = (size_t)L * P;
  if (nlp == 0 || H == 0) return 0;
  std::vector<float> row(C > 0 ? C : 1), amax(H), inv(H);
  for (size_t lp = 0; lp < nlp; ++lp) {
    const size_t plane = lp * T * C;
    for (int h = 0; h < H; ++h) amax[h] = 0.0f;
    for (int t = 0; t < T; ++t) {
      load_row(x, dt, plane + (size_t)t * C, row.data(), C);
      for (int h = 0; h < H; ++h) amax[h] = absmax(row.data() + h * D, D, amax[h]);
    }
    for (int h = 0; h < H; ++h) {
      const float s = amax[h] / 448.0f;
      scales[lp * H + h] = canon(s);
      inv[h] = s > 0.0f ? 1.0f / s : 0.0f;
    }
    for (int t = 0; t < T; ++t) {
      load_row(x, dt, plane + (size_t)t * C, row.data(), C);
      uint8_t* o = codes + plane + (size_t)t * C;
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d) o[h * D + d] = f2e4m3(row[h * D + d] * inv[h]);
    }
  }
  return 0;
}

int kvl_fp8_decode(const float* scales, const uint8_t* codes, int dt, int L, int P, int T, int H, int D, void* out) {
  const int C = H * D;
  const size_t nlp = (size_t)L * P;
  std::vector<float> y(C > 0 ? C : 1);
  for (size_t lp = 0; lp < nlp; ++lp) {
    const size_t plane = lp * T * C;
    for (int t = 0; t < T; ++t) {
      const uint8_t* q = codes + plane + (size_t)t * C;
      for (int h = 0; h < H; ++h) {
        const float s = scales[lp * H + h];
        for (int d = 0; d < D; ++d) y[h * D + d] = canon(kE4M3.v[q[h * D + d]] * s);
      }
      store_row(y.data(), dt, out, plane + (size_t)t * C, C);
    }
  }
  return 0;
}

// Byte-shuffle (lz4.py::shuffle): byte j of element i -> dst[j * n + i]; the tail
// (nbytes % typesize) is copied as is. unshuffle is the inverse.
void kvl_shuffle(const uint8_t* src, uint8_t* dst, size_t nbytes, int ts) {
  const size_t n = nbytes / ts;
  if (ts == 2) {
    uint8_t* a = dst;
    uint8_t* b = dst + n;
    for (size_t i = 0; i < n; ++i) {
      a[i] = src[2 * i];
      b[i] = src[2 * i + 1];
    }
  } else if (ts == 4) {
    for (size_t i = 0; i < n; ++i) {
      dst[i] = src[4 * i];
      dst[n + i] = src[4 * i + 1];
      dst[2 * n + i] = src[4 * i + 2];
      dst[3 * n + i] = src[4 * i + 3];
    }
  } else {
    const size_t blk = 4096;
    for (size_t i0 = 0; i0 < n; i0 += blk) {
      const size_t i1 = i0 + blk < n ? i0 + blk : n;
      for (int j = 0; j < ts; ++j)
        for (size_t i = i0; i < i1; ++i) dst[j * n + i] = src[i * ts + j];
    }
  }
  std::memcpy(dst + n * ts, src + n * ts, nbytes - n * ts);
}

void kvl_unshuffle(const uint8_t* src, uint8_t* dst, size_t nbytes, int ts) {
  const size_t n = nbytes / ts;
  if (ts == 2) {
    const uint8_t* a = src;
    const uint8_t* b = src + n;
    for (size_t i = 0; i < n; ++i) {
      dst[2 * i] = a[i];
      dst[2 * i + 1] = b[i];
    }
  } else if (ts == 4) {
    for (size_t i = 0; i < n; ++i) {
      dst[4 * i] = src[i];
      dst[4 * i + 1] = src[n + i];
      dst[4 * i + 2] = src[2 * n + i];
      dst[4 * i + 3] = src[3 * n + i];
    }
  } else {
    const size_t blk = 4096;
    for (size_t i0 = 0; i0 < n; i0 += blk) {
      const size_t i1 = i0 + blk < n ? i0 + blk : n;
      for (int j = 0; j < ts; ++j)
        for (size_t i = i0; i < i1; ++i) dst[i * ts + j] = src[j * n + i];
    }
  }
  std::memcpy(dst + n * ts, src + n * ts, nbytes - n * ts);
}


// ---- rotated quantization (rotq.py). Outlier tokens of plane 0 (keys): mask[t] = 1 for at most
// max_out tokens whose key z-score (max over channels, summed over the layers 0, s, 2s, ... with
// s = ceil(L / 8)) exceeds 2.25 x the median. Sums run token by token, as in rotq.detect_torch.
static int rot_detect(const void* x, int dt, int L, int P, int T, int C, int max_out, uint8_t* mask) {
  std::memset(mask, 0, (size_t)(T > 0 ? T : 0));
  if (max_out <= 0 || T < 16 || L == 0 || C == 0) return 0;
  std::vector<float> buf((size_t)T * C), s(C), s2(C), mean(C), inv(C), score(T, 0.0f);
  const float fT = (float)T;
  const int stride = (L + 7) / 8;
  for (int l = 0; l < L; l += stride) {
    const size_t plane = (size_t)l * P * T * C;
    std::fill(s.begin(), s.end(), 0.0f);
    std::fill(s2.begin(), s2.end(), 0.0f);
    for (int t = 0; t < T; ++t) {
      float* __restrict r = buf.data() + (size_t)t * C;
      prefetch_row(x, dt, plane + (size_t)(t + kPrefetchRows) * C, C);
      load_row(x, dt, plane + (size_t)t * C, r, C);
      float* __restrict a = s.data();
      float* __restrict b = s2.data();
      for (int c = 0; c < C; ++c) {
        a[c] += r[c];
        b[c] += r[c] * r[c];
      }
    }
    for (int c = 0; c < C; ++c) {
      mean[c] = s[c] / fT;
      float var = s2[c] / fT - mean[c] * mean[c];
      var = var > 0.0f ? var : 0.0f;
      const float sd = std::sqrt(var);
      inv[c] = sd > 0.0f ? 1.0f / sd : 0.0f;
    }
    for (int t = 0; t < T; ++t) {
      const float* __restrict r = buf.data() + (size_t)t * C;
      float m = 0.0f;
      int c = 0;
#if defined(__AVX__)
      if (C >= 8) {  // max is exact in any order; max_ps(v, m) keeps m for a NaN v, as v -> 0 would
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 vm = _mm256_setzero_ps();
        for (; c + 8 <= C; c += 8) {
          const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(r + c), _mm256_loadu_ps(mean.data() + c));
          vm = _mm256_max_ps(_mm256_mul_ps(_mm256_andnot_ps(sign, d), _mm256_loadu_ps(inv.data() + c)), vm);
        }
        m = hmax8(vm);
      }
#endif
      for (; c < C; ++c) {
        float v = std::fabs(r[c] - mean[c]) * inv[c];
        v = v != v ? 0.0f : v;
        m = v > m ? v : m;
      }
      score[t] += m;
    }
  }
  std::vector<float> sorted(score);
  std::nth_element(sorted.begin(), sorted.begin() + (T - 1) / 2, sorted.end());
  const float thr = sorted[(T - 1) / 2] * 2.25f;
  std::vector<int> cand;
  for (int t = 0; t < T; ++t)
    if (score[t] > thr) cand.push_back(t);
  std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return score[a] > score[b]; });
  const int n = (int)cand.size() < max_out ? (int)cand.size() : max_out;
  for (int i = 0; i < n; ++i) mask[cand[i]] = 1;
  return n;
}

static size_t dtype_size(int dt) { return dt == F32 ? 4 : 2; }

// Row (l, p, t) of a [L, P, T, C] tensor of dtype dt <-> row i of raw [L, P, n, C].
static void copy_rows(const uint8_t* mask, int T, int L, int P, int C, size_t esz, const void* src, bool to_raw,
                      void* dst, int n) {
  int i = 0;
  for (int t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    for (int lp = 0; lp < L * P; ++lp) {
      const size_t full = ((size_t)lp * T + t) * C * esz, packed = ((size_t)lp * n + i) * C * esz;
      if (to_raw)
        std::memcpy((uint8_t*)dst + packed, (const uint8_t*)src + full, C * esz);
      else
        std::memcpy((uint8_t*)dst + full, (const uint8_t*)src + packed, C * esz);
    }
    ++i;
  }
}

// The outlier tokens of a [L, P, T, H, D] chunk (at most max_out): mask[t] = 1 for them, 0 for
// the others (T bytes); returns their number, or -1 on bad arguments. A separate call, so that the
// caller can size the payload (its last section holds these tokens' rows) before encoding.
int kvl_rot_detect(const void* x, int dt, int L, int P, int T, int H, int D, int max_out, uint8_t* mask) {
  if ((P != 1 && P != 2) || T < 0 || L < 0 || H < 0 || D < 0) return -1;
  return rot_detect(x, dt, L, P, T, H * D, max_out, mask);
}

// Encode a [L, P, T, H, D] chunk into rotq.py's layout, the outlier tokens given (mask, from
// kvl_rot_detect): writes the token bitmap (mask_bytes, zero-padded) and their raw rows ([L, P, n,
// C], the last section) and quantizes the rest. rot: rotate with scale c. rope: null, or the cos
// then sin tables [T, D/2] (rotq.rope_tables) to undo RoPE by each key's offset in the chunk
// first. Returns the number of outlier tokens, or -1 on bad arguments.
int kvl_rot_encode(const void* x, int dt, int L, int P, int T, int H, int D, int bits, int gk, int gv, int rot,
                   float c, const float* rope, const uint8_t* mask, int mask_bytes, float* v_base, float* k_base,
                   uint8_t* k_codes, uint8_t* v_codes, uint8_t* codes, uint8_t* mask_bits, void* raw) {
  if ((bits != 2 && bits != 4 && bits != 8) || gk < 1 || gv < 1 || (P != 1 && P != 2) || T < 0) return -1;
  if (rope && (P != 2 || D % 2)) return -1;
  const int C = H * D;
  const size_t rope_sin = (size_t)T * (D / 2);  // rope: cos [T, D/2] then sin [T, D/2]
  int n_out = 0;
  for (int t = 0; t < T; ++t) {
    if (mask[t] > 1) return -1;
    n_out += mask[t];
  }
  std::memset(mask_bits, 0, (size_t)mask_bytes);
  for (int t = 0; t < T; ++t) mask_bits[t / 8] |= (uint8_t)(mask[t] << (t % 8));
  copy_rows(mask, T, L, P, C, dtype_size(dt), x, true, raw, n_out);
  if (L == 0 || T == 0 || C == 0) {
    if (P == 2) std::memset(k_base, 0, sizeof(float) * 2 * (size_t)L * C);
    std::memset(v_base, 0, sizeof(float) * (size_t)L * H);
    return n_out;
  }
  const int rb = (C * bits + 7) / 8;
  const float qmax = (float)((1 << bits) - 1), half = qmax / 2.0f;
  const int nkg = (T + gk - 1) / gk;
  const int nvg = (D + gv - 1) / gv;
  const int ng = H * nvg;
  const float inf = INFINITY;
  std::vector<float> y((size_t)T * C), gmn((size_t)nkg * C), gmx((size_t)nkg * C), mn(C), inv(C);
  std::vector<float> need((size_t)T * ng), giv((size_t)T * ng), S(H), gtop((size_t)T * ng);
  std::vector<uint8_t> bad(C), q(C), gempty(nkg), hbad(H);
  bool all_ex = true;
  for (int t = 0; t < T; ++t) all_ex &= mask[t] != 0;
  for (int g = 0; g < nkg; ++g) {
    bool e = true;
    for (int t = g * gk; t < T && t < (g + 1) * gk; ++t) e &= mask[t] != 0;
    gempty[g] = e;
  }
  uint8_t* qdst = q.data();
#if defined(KVL_FAST64)
  const bool fast = D == 64 && (bits == 4 || bits == 8);
  const Fw64 fw(c);
#endif
  for (int l = 0; l < L; ++l) {
    if (P == 2) {
      // Keys: rows loaded and rotated, group min/max over the kept tokens' finite values in the
      // same pass; then bases and group codes; then codes.
      const size_t plane = (size_t)l * P * T * C;
#if defined(KVL_FAST64)
      // The fast path takes plain min/max and only notes whether anything was not finite (the
      // same results when everything is); if something was, the layer is redone carefully.
      bool quick = fast;
    redo:
      __mmask16 nonfinite = 0;
#endif
      std::fill(gmn.begin(), gmn.end(), inf);
      std::fill(gmx.begin(), gmx.end(), -inf);
      std::fill(bad.begin(), bad.end(), 0);
      for (int t = 0; t < T; ++t) {
        float* __restrict r = y.data() + (size_t)t * C;
#if defined(KVL_FAST64)
        if (quick) {
          float* a = gmn.data() + (size_t)(t / gk) * C;
          float* b = gmx.data() + (size_t)(t / gk) * C;
          const bool kept = !mask[t];
          prefetch_row(x, dt, plane + (size_t)(t + kPrefetchRows) * C, C);
          for (int h = 0; h < H; ++h) {
            __m512 v[4];
            for (int k = 0; k < 4; ++k) v[k] = load16(x, dt, plane + (size_t)t * C + h * 64 + 16 * k);
            if (rope) rope64_regs<true>(v, rope + (size_t)t * 32, rope + rope_sin + (size_t)t * 32);
            if (rot) fwht64_regs(v, fw);
            float* rh = r + h * 64;
            _mm512_storeu_ps(rh, v[0]);
            _mm512_storeu_ps(rh + 16, v[1]);
            _mm512_storeu_ps(rh + 32, v[2]);
            _mm512_storeu_ps(rh + 48, v[3]);
            if (!kept) continue;
            float* ah = a + h * 64;
            float* bh = b + h * 64;
#define KVL_MINMAX(k)                                                                                 \
  nonfinite |= _mm512_fpclass_ps_mask(v[k], 0x99); /* NaN, +-inf */                                     \
  _mm512_storeu_ps(ah + 16 * k, _mm512_min_ps(v[k], _mm512_loadu_ps(ah + 16 * k)));                    \
  _mm512_storeu_ps(bh + 16 * k, _mm512_max_ps(v[k], _mm512_loadu_ps(bh + 16 * k)));
            KVL_MINMAX(0)
            KVL_MINMAX(1)
            KVL_MINMAX(2)
            KVL_MINMAX(3)
#undef KVL_MINMAX
          }
          continue;
        }
#endif
        load_row(x, dt, plane + (size_t)t * C, r, C);
        if (rope) rope_row<true>(r, H, D, rope + (size_t)t * (D / 2), rope + rope_sin + (size_t)t * (D / 2));
        if (rot) fwht_row(r, H, D, c);
        if (mask[t]) continue;
        float* __restrict a = gmn.data() + (size_t)(t / gk) * C;
        float* __restrict b = gmx.data() + (size_t)(t / gk) * C;
        uint8_t* __restrict n = bad.data();
        int cc = 0;
#if defined(__AVX__)
        {
          const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(kF32Max);
          const __m256 vinf = _mm256_set1_ps(inf), vninf = _mm256_set1_ps(-inf);
          for (; cc + 8 <= C; cc += 8) {
            const __m256 v = _mm256_loadu_ps(r + cc);
            const __m256 f = _mm256_cmp_ps(_mm256_andnot_ps(sign, v), big, _CMP_LE_OQ);
            _mm256_storeu_ps(a + cc, _mm256_min_ps(_mm256_blendv_ps(vinf, v, f), _mm256_loadu_ps(a + cc)));
            _mm256_storeu_ps(b + cc, _mm256_max_ps(_mm256_blendv_ps(vninf, v, f), _mm256_loadu_ps(b + cc)));
            const int nf = ~_mm256_movemask_ps(f) & 0xFF;
            if (nf)
              for (int k = 0; k < 8; ++k) n[cc + k] |= (nf >> k) & 1;
          }
        }
#endif
        for (; cc < C; ++cc) {
          const float v = r[cc];
          const bool f = std::fabs(v) <= kF32Max;
          const float vmn = f ? v : inf, vmx = f ? v : -inf;
          a[cc] = vmn < a[cc] ? vmn : a[cc];
          b[cc] = vmx > b[cc] ? vmx : b[cc];
          n[cc] |= !f;
        }
      }
#if defined(KVL_FAST64)
      if (quick && nonfinite) {
        quick = false;
        goto redo;
      }
#endif
      float* kb = k_base + (size_t)l * 2 * C;
      for (int cc = 0; cc < C; ++cc) {
        float bmin = 0.0f, bmax = 0.0f;
        if (!all_ex) {
          bmin = inf;
          bmax = -inf;
          for (int g = 0; g < nkg; ++g) {
            const float a = gmn[(size_t)g * C + cc], b = gmx[(size_t)g * C + cc];
            bmin = a < bmin ? a : bmin;
            bmax = b > bmax ? b : bmax;
          }
        }
        if (bad[cc] || !finite(bmax - bmin)) bmin = bmax = kNaN;
        kb[cc] = bmin;
        kb[C + cc] = bmax;
      }
      for (int g = 0; g < nkg; ++g) {
        uint8_t* lo_out = k_codes + ((size_t)l * nkg + g) * 2 * C;
        k_group_codes(kb, C, gmn.data() + (size_t)g * C, gmx.data() + (size_t)g * C, gempty[g], qmax, lo_out,
                      lo_out + C, mn.data(), inv.data());
        const int t1 = (g + 1) * gk < T ? (g + 1) * gk : T;
        for (int t = g * gk; t < t1; ++t) {
          uint8_t* dst = codes + (((size_t)l * P) * T + t) * rb;
#if defined(KVL_FAST64)
          if (fast) {
            const float* r = y.data() + (size_t)t * C;
            for (int cc = 0; cc < C; cc += 16)
              put16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(r + cc), _mm512_loadu_ps(mn.data() + cc)),
                                  _mm512_loadu_ps(inv.data() + cc)), qmax, bits, dst, cc);
            continue;
          }
#endif
          quant_row<false>(y.data() + (size_t)t * C, mn.data(), inv.data(), 0.0f, qmax, bits == 8 ? dst : qdst, C);
          if (bits != 8) pack_row(qdst, C, bits, dst, rb);
        }
      }
    }
    // Values (plane P - 1): per token, groups of gv channels of each head, symmetric levels,
    // log-coded scales against the (layer, head) maximum.
    const size_t plane = ((size_t)l * P + (P - 1)) * T * C;
    std::fill(hbad.begin(), hbad.end(), 0);
    for (int t = 0; t < T; ++t) {
      float* r = y.data() + (size_t)t * C;
#if defined(KVL_FAST64)
      if (fast && gv % 16 == 0) {
        const __m512 big = _mm512_set1_ps(kF32Max);
        prefetch_row(x, dt, plane + (size_t)(t + kPrefetchRows) * C, C);
        for (int h = 0; h < H; ++h) {
          __m512 v[4];
          for (int k = 0; k < 4; ++k) v[k] = load16(x, dt, plane + (size_t)t * C + h * 64 + 16 * k);
          if (rot) fwht64_regs(v, fw);
          __mmask16 ok = 0xFFFF;
          for (int k = 0; k < 4; ++k) {
            _mm512_storeu_ps(r + h * 64 + 16 * k, v[k]);
            v[k] = _mm512_abs_ps(v[k]);
            ok &= _mm512_cmp_ps_mask(v[k], big, _CMP_LE_OQ);
          }
          hbad[h] |= ok != 0xFFFF;
          // Each group's largest magnitude (divided by half below, 16 groups at a time, off this
          // loop's dependency chain); fixed register indices keep v[] out of memory.
          float* mx = need.data() + (size_t)t * ng + h * nvg;
          if (gv == 16) {
            for (int k = 0; k < 4; ++k) mx[k] = _mm512_reduce_max_ps(v[k]);
          } else if (gv == 32) {
            mx[0] = _mm512_reduce_max_ps(_mm512_max_ps(v[1], v[0]));
            mx[1] = _mm512_reduce_max_ps(_mm512_max_ps(v[3], v[2]));
          } else if (gv >= 64) {
            mx[0] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(v[3], v[2]), _mm512_max_ps(v[1], v[0])));
          } else {  // 48: the second group is partial
            mx[0] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(v[2], v[1]), v[0]));
            mx[1] = _mm512_reduce_max_ps(v[3]);
          }
        }
        if (t == T - 1) {  // need = largest magnitude / half, as the generic path computes it
          const __m512 vh = _mm512_set1_ps(half);
          size_t i = 0;
          for (; i + 16 <= (size_t)T * ng; i += 16) _mm512_storeu_ps(need.data() + i, _mm512_div_ps(_mm512_loadu_ps(need.data() + i), vh));
          for (; i < (size_t)T * ng; ++i) need[i] = need[i] / half;
        }
        continue;
      }
#endif
      load_row(x, dt, plane + (size_t)t * C, r, C);
      if (rot) fwht_row(r, H, D, c);
      for (int h = 0; h < H; ++h)
        for (int g = 0; g < nvg; ++g) {
          const int c0 = h * D + g * gv;
          const int c1 = g * gv + gv < D ? c0 + gv : h * D + D;
          bool f = true;
          const float a = absmax_fin(r + c0, c1 - c0, &f);
          hbad[h] |= !f;
          need[(size_t)t * ng + h * nvg + g] = a / half;
        }
    }
    for (int h = 0; h < H; ++h) {
      float m = 0.0f;
      if (!hbad[h])
        for (int t = 0; t < T; ++t)
          for (int g = 0; g < nvg; ++g) {
            const float v = need[(size_t)t * ng + h * nvg + g];
            m = v > m ? v : m;
          }
      S[h] = hbad[h] ? kNaN : scale_top(m);
      v_base[(size_t)l * H + h] = S[h];
    }
    uint8_t* vcode = v_codes + (size_t)l * T * ng;
    size_t gi0 = 0;
#if defined(KVL_FAST64)
    // scale_code / scale_of / 1/scale for 16 groups at a time (integer bit work, one division
    // instruction for 16), each lane exactly as the scalar loop below computes it.
    for (size_t i = 0; i < (size_t)ng; ++i) gtop[i] = hbad[i / nvg] ? kNaN : S[i / nvg];
    for (size_t i = ng; i < (size_t)T * ng; ++i) gtop[i] = gtop[i - ng];  // the (layer, head) top per group
    {
      const __m512i low = _mm512_set1_epi32((1 << kScaleDrop) - 1), m31 = _mm512_set1_epi32(31);
      const __m512i one = _mm512_set1_epi32(1), seven = _mm512_set1_epi32(7), zero = _mm512_setzero_si512();
      for (; gi0 + 16 <= (size_t)T * ng; gi0 += 16) {
        const __m512 top = _mm512_loadu_ps(gtop.data() + gi0), nd = _mm512_loadu_ps(need.data() + gi0);
        const __mmask16 isnan = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q);
        const __m512i eu = _mm512_srli_epi32(_mm512_castps_si512(top), 23);
        const __mmask16 eu0 = _mm512_cmpeq_epi32_mask(eu, zero);
        const __m512i emax5 = _mm512_slli_epi32(_mm512_min_epi32(_mm512_sub_epi32(eu, one), seven), 5);
        const __m512i v = _mm512_andnot_si512(low, _mm512_add_epi32(_mm512_castps_si512(nd), low));
        const __m512i e = _mm512_sub_epi32(eu, _mm512_srli_epi32(v, 23));
        const __mmask16 pos = _mm512_cmp_ps_mask(nd, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __mmask16 fits = pos & _mm512_cmple_epi32_mask(_mm512_slli_epi32(e, 5), emax5);
        __m512i code = _mm512_mask_or_epi32(emax5, fits, _mm512_slli_epi32(e, 5),
                                            _mm512_and_si512(_mm512_srli_epi32(v, kScaleDrop), m31));
        code = _mm512_maskz_mov_epi32(~(eu0 | isnan), code);  // scale_code: 0 for eu == 0; 0 where hbad
        _mm_storeu_si128((__m128i*)(vcode + gi0), _mm512_cvtepi32_epi8(code));
        const __m512i bits = _mm512_or_si512(
            _mm512_slli_epi32(_mm512_sub_epi32(eu, _mm512_srai_epi32(code, 5)), 23),
            _mm512_slli_epi32(_mm512_and_si512(code, m31), kScaleDrop));
        const __m512 sc = _mm512_maskz_mov_ps(~(eu0 | isnan), _mm512_castsi512_ps(bits));  // scale_of (NaN -> 0 below)
        const __mmask16 gt = _mm512_cmp_ps_mask(sc, _mm512_setzero_ps(), _CMP_GT_OQ);
        _mm512_storeu_ps(giv.data() + gi0, _mm512_maskz_div_ps(gt, _mm512_set1_ps(1.0f), sc));
      }
    }
#endif
    for (size_t gi = gi0; gi < (size_t)T * ng; ++gi) {
      const int h = (int)(gi % ng) / nvg;
      const int code = hbad[h] ? 0 : scale_code(S[h], need[gi]);
      vcode[gi] = (uint8_t)code;
      const float sc = scale_of(S[h], code);
      giv[gi] = sc > 0.0f ? 1.0f / sc : 0.0f;
    }
    for (int t = 0; t < T; ++t) {
      uint8_t* dst = codes + (((size_t)l * P + (P - 1)) * T + t) * rb;
#if defined(KVL_FAST64)
      if (fast && gv % 16 == 0) {  // one scale per 16 channels: broadcast its inverse, no per-channel table
        const float* r = y.data() + (size_t)t * C;
        const float* iv = giv.data() + (size_t)t * ng;
        const __m512 vh = _mm512_set1_ps(half);
        for (int h = 0; h < H; ++h)
          for (int k = 0; k < 4; ++k) {
            const int cc = h * 64 + 16 * k;
            put16(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(r + cc), _mm512_set1_ps(iv[h * nvg + 16 * k / gv])), vh),
                  qmax, bits, dst, cc);
          }
        continue;
      }
#endif
      for (int h = 0; h < H; ++h)
        for (int g = 0; g < nvg; ++g) {
          const float iv = giv[(size_t)t * ng + h * nvg + g];
          const int c0 = h * D + g * gv;
          const int c1 = g * gv + gv < D ? c0 + gv : h * D + D;
          int cc = c0;
#if defined(__AVX__)
          const __m256 vi = _mm256_set1_ps(iv);
          for (; cc + 8 <= c1; cc += 8) _mm256_storeu_ps(inv.data() + cc, vi);
#endif
          for (; cc < c1; ++cc) inv[cc] = iv;
        }
#if defined(KVL_FAST64)
      if (fast) {
        const float* r = y.data() + (size_t)t * C;
        const __m512 vh = _mm512_set1_ps(half);
        for (int cc = 0; cc < C; cc += 16)
          put16(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(r + cc), _mm512_loadu_ps(inv.data() + cc)), vh), qmax,
                bits, dst, cc);
        continue;
      }
#endif
      quant_row<true>(y.data() + (size_t)t * C, nullptr, inv.data(), half, qmax, bits == 8 ? dst : qdst, C);
      if (bits != 8) pack_row(qdst, C, bits, dst, rb);
    }
  }
  return n_out;
}

// Whether metadata this small and finite rules out NaN in what it decodes to: every decoded value
// is then a finite sum of at most a few hundred terms far below the float range (so no inf - inf
// in the transform), and canonicalising NaN can be skipped.
static bool tame(const float* m, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!(std::fabs(m[i]) < 0x1p100f)) return false;
  return true;
}

// Decode into out ([L, P, T, H, D] of dtype dt), the outlier tokens' raw rows written back; rope
// (as for the encoder) puts the keys' RoPE back. Returns 0, 1 on bad arguments, 2 when the bitmap does not hold n_out tokens (or has padding set).
int kvl_rot_decode(const float* v_base, const float* k_base, const uint8_t* k_codes, const uint8_t* v_codes,
                   const uint8_t* codes, const uint8_t* mask_bits, const void* raw, int mask_bytes, int n_out, int dt, int L, int P,
                   int T, int H, int D, int bits, int gk, int gv, int rot, float c, const float* rope, void* out) {
  if ((bits != 2 && bits != 4 && bits != 8) || gk < 1 || gv < 1 || (P != 1 && P != 2) || T < 0) return 1;
  if (rope && (P != 2 || D % 2)) return 1;
  const int C = H * D;
  const size_t rope_sin = (size_t)T * (D / 2);
  std::vector<uint8_t> mask((size_t)T + 1);
  int count = 0;
  const size_t mb = (size_t)mask_bytes;
  for (size_t b = 0; b < mb; ++b)
    for (int k = 0; k < 8; ++k) {
      const size_t t = b * 8 + k;
      const int bit = (mask_bits[b] >> k) & 1;
      if (t >= (size_t)T) {
        if (bit) return 2;
      } else {
        mask[t] = (uint8_t)bit;
        count += bit;
      }
    }
  if (count != n_out) return 2;
  if (L == 0 || T == 0 || C == 0) return 0;  // nothing to decode, no rows to write back
  const int rb = (C * bits + 7) / 8;
  const float qmax = (float)((1 << bits) - 1), half = qmax / 2.0f;
  const int nkg = (T + gk - 1) / gk;
  const int nvg = (D + gv - 1) / gv;
  const int ng = H * nvg;
  std::vector<float> qf(C), y(C), s(C), z(C), gs(ng);
#if defined(KVL_FAST64)
  const bool fast = D == 64 && (bits == 4 || bits == 8);
  const Fw64 fw(c);
#endif
  for (int l = 0; l < L; ++l) {
    if (P == 2) {
      const float* kb = k_base + (size_t)l * 2 * C;
      const size_t plane = (size_t)l * P * T * C;
      const bool kcanon = !tame(kb, 2 * C);
      for (int g = 0; g < nkg; ++g) {
        const uint8_t* lo = k_codes + ((size_t)l * nkg + g) * 2 * C;
        const uint8_t* hi = lo + C;
        for (int cc = 0; cc < C; ++cc) {
          const float bmin = kb[cc], step = (kb[C + cc] - bmin) / 255.0f;
          const float mn = bmin + (float)lo[cc] * step;
          const float mx = bmin + (float)hi[cc] * step;
          z[cc] = mn;
          s[cc] = (mx - mn) / qmax;
        }
        const int t1 = (g + 1) * gk < T ? (g + 1) * gk : T;
#if defined(KVL_FAST64)
        if (fast) {
          const uint8_t* kc = codes + ((size_t)l * P) * T * rb;
          const float* sn = rope ? rope + rope_sin : nullptr;  // rope: cos [T, 32], then sin
          const float* cs = rope;
          if (bits == 4)
            dec_krows_dt<4>(dt, rope != nullptr, kc, rb, g * gk, t1, s.data(), z.data(), H, rot, fw, cs, sn, out, plane, kcanon);
          else
            dec_krows_dt<8>(dt, rope != nullptr, kc, rb, g * gk, t1, s.data(), z.data(), H, rot, fw, cs, sn, out, plane, kcanon);
          continue;
        }
#endif
        for (int t = g * gk; t < t1; ++t) {
          unpack_fast(codes + (((size_t)l * P) * T + t) * rb, C, bits, qf.data());
          float* __restrict yy = y.data();
          const float* __restrict qq = qf.data();
          const float* __restrict ss = s.data();
          const float* __restrict zz = z.data();
          for (int cc = 0; cc < C; ++cc) yy[cc] = qq[cc] * ss[cc] + zz[cc];
          if (rot) fwht_row(yy, H, D, c);
          if (rope) rope_row<false>(yy, H, D, rope + (size_t)t * (D / 2), rope + rope_sin + (size_t)t * (D / 2));
          for (int cc = 0; cc < C; ++cc) yy[cc] = canon(yy[cc]);
          store_row(yy, dt, out, plane + (size_t)t * C, C);
        }
      }
    }
    const size_t plane = ((size_t)l * P + (P - 1)) * T * C;
    const bool vcanon = !tame(v_base + (size_t)l * H, H);
#if defined(KVL_FAST64)
    if (fast && gv % 16 == 0) {  // one scale per 16 channels: broadcast, no per-channel table
      const uint8_t* vr = codes + ((size_t)l * P + (P - 1)) * T * rb;
      const uint8_t* vcodes = v_codes + (size_t)l * T * ng;
      const float* top = v_base + (size_t)l * H;
      if (bits == 4)
        dec_vrows_dt<4>(dt, vr, rb, vcodes, top, T, H, nvg, gv, rot, fw, out, plane, vcanon, gs.data());
      else
        dec_vrows_dt<8>(dt, vr, rb, vcodes, top, T, H, nvg, gv, rot, fw, out, plane, vcanon, gs.data());
      continue;
    }
#endif
    for (int t = 0; t < T; ++t) {
      const uint8_t* vc = v_codes + ((size_t)l * T + t) * ng;
      for (int h = 0; h < H; ++h)
        for (int g = 0; g < nvg; ++g) gs[h * nvg + g] = scale_of(v_base[(size_t)l * H + h], vc[h * nvg + g]);
      for (int h = 0; h < H; ++h)
        for (int g = 0; g < nvg; ++g) {
          const int c0 = h * D + g * gv;
          const int c1 = g * gv + gv < D ? c0 + gv : h * D + D;
          const float sc = gs[h * nvg + g];
          int cc = c0;
#if defined(__AVX__)
          const __m256 vs = _mm256_set1_ps(sc);
          for (; cc + 8 <= c1; cc += 8) _mm256_storeu_ps(s.data() + cc, vs);
#endif
          for (; cc < c1; ++cc) s[cc] = sc;
        }
#if defined(KVL_FAST64)
      if (fast) {  // value groups that are not a multiple of 16 channels: a scale per channel
        const uint8_t* row = codes + (((size_t)l * P + (P - 1)) * T + t) * rb;
        const __m512 vh = _mm512_set1_ps(half);
        for (int h = 0; h < H; ++h) {
          __m512 v[4];
          for (int k = 0; k < 4; ++k) {
            const int cc = h * 64 + 16 * k;
            v[k] = _mm512_mul_ps(_mm512_sub_ps(codes16(row, bits, cc), vh), _mm512_loadu_ps(s.data() + cc));
          }
          if (rot) fwht64_regs(v, fw);
          for (int k = 0; k < 4; ++k) store16(v[k], dt, out, plane + (size_t)t * C + h * 64 + 16 * k, vcanon);
        }
        continue;
      }
#endif

      unpack_fast(codes + (((size_t)l * P + (P - 1)) * T + t) * rb, C, bits, qf.data());
      float* __restrict yy = y.data();
      const float* __restrict qq = qf.data();
      const float* __restrict ss = s.data();
      for (int cc = 0; cc < C; ++cc) yy[cc] = (qq[cc] - half) * ss[cc];
      if (rot) fwht_row(yy, H, D, c);
      for (int cc = 0; cc < C; ++cc) yy[cc] = canon(yy[cc]);
      store_row(yy, dt, out, plane + (size_t)t * C, C);
    }
  }
  copy_rows(mask.data(), T, L, P, C, dtype_size(dt), raw, false, out, n_out);
  return 0;
}

}  // extern "C"
