// kvlayer CPU codec kernels: KIVI int8/int4/int2 quantize/dequantize, fp8 (e4m3fn), byte-shuffle.
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

}  // namespace

extern "C" {

int kvl_abi_version(void) { return 1; }

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

}  // extern "C"
