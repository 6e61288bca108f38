// kvlayer CUDA codec kernels: KIVI int8/int4/int2 quantize and fp8 (e4m3fn) encode of a chunk
// that lives on the GPU, so only the encoded payload crosses PCIe (kvlayer/codec/cuda.py).
//
// Same layouts and the same fp32 arithmetic as csrc/cpu/codec.cpp and the torch reference
// (kvlayer/codec/quant.py, fp8.py), bit for bit: round half to even (rintf), no fused
// multiply-add (__fmul_rn/__fadd_rn, and the library is built with --fmad=false), min/max + 0.0
// (-0 -> +0, as `amin(...) + 0.0`), canonical NaN. Decoding stays on the CPU: blobs are read from
// host tiers, and a decoded chunk is what the engine's scatter uploads.
//
// Work split: K (per channel) - one thread per (layer, token group, byte of the packed row);
// V (per token) - one thread per (layer, token, head, channel group), codes packed by pack_v.

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace kvl {

enum DType : int { F16 = 0, BF16 = 1, F32 = 2 };

__device__ __forceinline__ float canon(float v) { return v != v ? __int_as_float(0x7FC00000) : v; }

__device__ __forceinline__ float load(const void* p, int dt, size_t i) {
  if (dt == F16) return __half2float(reinterpret_cast<const __half*>(p)[i]);
  if (dt == BF16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
  return reinterpret_cast<const float*>(p)[i];
}

__device__ __forceinline__ float nan_min(float a, float v) { return (v < a || v != v) ? v : a; }
__device__ __forceinline__ float nan_max(float a, float v) { return (v > a || v != v) ? v : a; }

// Group parameters; half = fp16 meta (fp16 chunks), else fp32 meta. Writes meta, returns z/inv.
__device__ __forceinline__ void put_meta(bool half, void* scale, void* zero, size_t i, float mn, float mx,
                                         float qmax, float* z, float* inv) {
  float zf, sf;
  if (half) {
    __half zh = __float2half_rn(mn);
    zf = __half2float(zh);
    const float s = __fdiv_rn(__fsub_rn(mx, zf), qmax);
    unsigned short sh = __half_as_ushort(__float2half_rn(s));
    if (__half2float(__ushort_as_half(sh)) < s) sh = (unsigned short)(sh + 1);
    sf = __half2float(__ushort_as_half(sh));
    reinterpret_cast<unsigned short*>(zero)[i] = zf != zf ? (unsigned short)0x7E00 : __half_as_ushort(zh);
    reinterpret_cast<unsigned short*>(scale)[i] = sf != sf ? (unsigned short)0x7E00 : sh;
  } else {
    zf = mn;
    sf = __fdiv_rn(__fsub_rn(mx, zf), qmax);
    reinterpret_cast<float*>(zero)[i] = canon(zf);
    reinterpret_cast<float*>(scale)[i] = canon(sf);
  }
  *z = zf;
  *inv = sf > 0.0f ? __fdiv_rn(1.0f, sf) : 0.0f;
}

__device__ __forceinline__ unsigned quant1(float x, float z, float inv, float qmax) {
  float t = __fmul_rn(__fsub_rn(x, z), inv);
  t = t > 0.0f ? t : 0.0f;
  t = t < qmax ? t : qmax;
  return (unsigned)rintf(t);
}

// K: grid over (layer, group, byte of the packed row); each thread owns `per` channels.
__global__ void quant_k(const void* x, int dt, int L, int P, int T, int C, int bits, int gk, void* ks, void* kz,
                        uint8_t* codes) {
  const int per = 8 / bits, rb = (C * bits + 7) / 8, nkg = (T + gk - 1) / gk;
  const size_t n = (size_t)L * nkg * rb;
  const float qmax = (float)((1 << bits) - 1);
  const bool half = dt == F16;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
    const int j = idx % rb;
    const int g = (idx / rb) % nkg;
    const int l = idx / ((size_t)rb * nkg);
    const int t0 = g * gk, t1 = min(T, t0 + gk);
    const size_t plane = (size_t)l * P * T * C;
    float z[8], inv[8];
    for (int i = 0; i < per; ++i) {
      const int c = j * per + i;
      if (c >= C) break;
      float mn = load(x, dt, plane + (size_t)t0 * C + c), mx = mn;
      for (int t = t0 + 1; t < t1; ++t) {
        const float v = load(x, dt, plane + (size_t)t * C + c);
        mn = nan_min(mn, v);
        mx = nan_max(mx, v);
      }
      mn = __fadd_rn(mn, 0.0f);
      mx = __fadd_rn(mx, 0.0f);
      put_meta(half, ks, kz, ((size_t)l * nkg + g) * C + c, mn, mx, qmax, &z[i], &inv[i]);
    }
    for (int t = t0; t < t1; ++t) {
      unsigned b = 0;
      for (int i = 0; i < per; ++i) {
        const int c = j * per + i;
        if (c >= C) break;
        b |= quant1(load(x, dt, plane + (size_t)t * C + c), z[i], inv[i], qmax) << (bits * i);
      }
      codes[((size_t)l * P * T + t) * rb + j] = (uint8_t)b;
    }
  }
}

// V: one thread per (layer, token, head, group); codes of the V plane are written by pack_v.
__global__ void quant_v(const void* x, int dt, int L, int P, int T, int H, int D, int bits, int gv, void* vs,
                        void* vz, uint8_t* q) {
  const int nvg = (D + gv - 1) / gv, C = H * D;
  const size_t n = (size_t)L * T * H * nvg;
  const float qmax = (float)((1 << bits) - 1);
  const bool half = dt == F16;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
    const int g = idx % nvg;
    const int h = (idx / nvg) % H;
    const size_t lt = idx / ((size_t)nvg * H);  // l * T + t
    const int l = lt / T, t = lt % T;
    const size_t row = (((size_t)l * P + (P - 1)) * T + t) * C;
    const int c0 = h * D + g * gv, c1 = min(h * D + D, c0 + gv);
    float mn = load(x, dt, row + c0), mx = mn;
    for (int c = c0 + 1; c < c1; ++c) {
      const float v = load(x, dt, row + c);
      mn = nan_min(mn, v);
      mx = nan_max(mx, v);
    }
    mn = __fadd_rn(mn, 0.0f);
    mx = __fadd_rn(mx, 0.0f);
    float z, inv;
    put_meta(half, vs, vz, idx, mn, mx, qmax, &z, &inv);
    for (int c = c0; c < c1; ++c) q[lt * C + c] = (uint8_t)quant1(load(x, dt, row + c), z, inv, qmax);
  }
}

__global__ void pack_v(const uint8_t* q, int L, int P, int T, int C, int bits, uint8_t* codes) {
  const int per = 8 / bits, rb = (C * bits + 7) / 8;
  const size_t n = (size_t)L * T * rb;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
    const int j = idx % rb;
    const size_t lt = idx / rb;
    const int l = lt / T, t = lt % T;
    unsigned b = 0;
    for (int i = 0; i < per; ++i) {
      const int c = j * per + i;
      if (c < C) b |= (unsigned)q[lt * C + c] << (bits * i);
    }
    codes[(((size_t)l * P + (P - 1)) * T + t) * rb + j] = (uint8_t)b;
  }
}

// fp8 e4m3fn, c10's conversion (RNE, saturating, NaN -> 0x7f | sign).
__device__ __forceinline__ uint8_t f2e4m3(float f) {
  uint32_t f_bits = __float_as_uint(f);
  const uint32_t sign = f_bits & 0x80000000u;
  f_bits ^= sign;
  uint8_t r;
  if (f_bits >= (1087u << 20)) {
    r = f_bits > 0x7F800000u ? 0x7f : 0x7e;
  } else if (f_bits < (121u << 23)) {
    const uint32_t dm = 141u << 23;
    f_bits = __float_as_uint(__fadd_rn(__uint_as_float(f_bits), __uint_as_float(dm)));
    r = (uint8_t)(f_bits - dm);
  } else {
    const uint32_t odd = (f_bits >> 20) & 1;
    f_bits += ((uint32_t)(7 - 127) << 23) + 0x7FFFF;
    f_bits += odd;
    r = (uint8_t)(f_bits >> 20);
    if (r == 0x7f) r = 0x7e;
  }
  return r | (uint8_t)(sign >> 24);
}

// One block per (layer, plane, head): block-reduce amax, then encode the slice.
__global__ void fp8_encode(const void* x, int dt, int L, int P, int T, int H, int D, float* scales, uint8_t* codes) {
  __shared__ float red[256];
  const int lph = blockIdx.x;
  const int h = lph % H;
  const size_t lp = lph / H;
  const size_t n = (size_t)T * D, C = (size_t)H * D;
  float a = 0.0f;
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) a = nan_max(a, fabsf(load(x, dt, (lp * T + i / D) * C + h * D + i % D)));
  red[threadIdx.x] = a;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = nan_max(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  const float sc = __fdiv_rn(red[0], 448.0f);
  const float inv = sc > 0.0f ? __fdiv_rn(1.0f, sc) : 0.0f;
  if (threadIdx.x == 0) scales[lph] = canon(sc);
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
    const size_t o = (lp * T + i / D) * C + h * D + i % D;
    codes[o] = f2e4m3(__fmul_rn(load(x, dt, o), inv));
  }
}

}  // namespace kvl

extern "C" {

static int blocks_for(size_t n) { return (int)((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535); }

// Host launchers (device pointers, layouts as in csrc/cpu/codec.cpp). `q_scratch` holds L*T*H*D
// bytes for the V codes before packing. Return a cudaError_t value (0 = success).
int kvl_cuda_quantize(const void* x, int dt, int L, int P, int T, int H, int D, int bits, int gk, int gv, void* ks,
                      void* kz, void* vs, void* vz, uint8_t* codes, uint8_t* q_scratch, cudaStream_t stream) {
  const int C = H * D;
  if (L == 0 || T == 0 || C == 0) return 0;
  const int rb = (C * bits + 7) / 8, nkg = (T + gk - 1) / gk, nvg = (D + gv - 1) / gv;
  if (P == 2) kvl::quant_k<<<blocks_for((size_t)L * nkg * rb), 256, 0, stream>>>(x, dt, L, P, T, C, bits, gk, ks, kz, codes);
  kvl::quant_v<<<blocks_for((size_t)L * T * H * nvg), 256, 0, stream>>>(x, dt, L, P, T, H, D, bits, gv, vs, vz, q_scratch);
  kvl::pack_v<<<blocks_for((size_t)L * T * rb), 256, 0, stream>>>(q_scratch, L, P, T, C, bits, codes);
  return (int)cudaGetLastError();
}

int kvl_cuda_fp8_encode(const void* x, int dt, int L, int P, int T, int H, int D, float* scales, uint8_t* codes,
                        cudaStream_t stream) {
  if ((size_t)L * P * H == 0) return 0;
  kvl::fp8_encode<<<L * P * H, 256, 0, stream>>>(x, dt, L, P, T, H, D, scales, codes);
  return (int)cudaGetLastError();
}

}  // extern "C"
