// kvlayer paged <-> chunk copies for CUDA: gather, scatter, and gather fused with int8.
//
// Plain C launchers (no torch headers), called from kvlayer/ops.py through ctypes, so the
// library does not depend on torch's C++ ABI. Every layer's K and V are described by a base
// address plus (block, token, head, dim) strides in elements: any attention backend's layout
// that a layout adapter can express as strided views works unchanged. The chunk side is the
// canonical contiguous [layers, 2, n_blocks * block_size, heads, dim].
//
// Build: nvcc -O3 -shared -Xcompiler -fPIC -std=c++17 paged_copy.cu -o libkvlayer_paged_copy.so
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

struct Geometry {
  const int64_t* ptrs;      // [layers][2] base addresses (device memory)
  const int64_t* strides;   // [2][4] element strides: block, token, head, dim (device memory)
  const int64_t* block_ids; // [n_blocks] (device memory)
  int64_t n_blocks, layers, block_size, heads, dim;
};

__device__ __forceinline__ int64_t paged_offset(const Geometry& g, int plane, int64_t block,
                                                int64_t t, int64_t h, int64_t d) {
  const int64_t* s = g.strides + plane * 4;
  return block * s[0] + t * s[1] + h * s[2] + d * s[3];
}

// One CUDA block per (layer, plane, page); threads stride over the page's elements.
template <typename T, bool kGather>
__global__ void copy_kernel(Geometry g, T* chunk) {
  const int64_t page = blockIdx.x;  // (layer * 2 + plane) * n_blocks + j
  const int64_t j = page % g.n_blocks;
  const int64_t lp = page / g.n_blocks;
  const int plane = static_cast<int>(lp % 2);
  const int64_t layer = lp / 2;
  T* base = reinterpret_cast<T*>(g.ptrs[layer * 2 + plane]);
  const int64_t block = g.block_ids[j];
  const int64_t hd = g.heads * g.dim;
  const int64_t elems = g.block_size * hd;
  T* dst_page = chunk + (lp * g.n_blocks + j) * elems;
  for (int64_t i = threadIdx.x; i < elems; i += blockDim.x) {
    const int64_t t = i / hd, h = (i / g.dim) % g.heads, d = i % g.dim;
    const int64_t off = paged_offset(g, plane, block, t, h, d);
    if (kGather) dst_page[i] = base[off];
    else base[off] = dst_page[i];
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }

// One warp per (layer, plane, token, head) row of `dim` values: amax -> scale -> int8.
template <typename T>
__global__ void gather_int8_kernel(Geometry g, int8_t* q, float* scale) {
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t tokens = g.n_blocks * g.block_size;
  const int64_t rows = g.layers * 2 * tokens * g.heads;
  if (row >= rows) return;
  const int64_t h = row % g.heads;
  const int64_t tok = (row / g.heads) % tokens;
  const int64_t lp = row / (g.heads * tokens);
  const int plane = static_cast<int>(lp % 2);
  const int64_t layer = lp / 2;
  const T* base = reinterpret_cast<const T*>(g.ptrs[layer * 2 + plane]);
  const int64_t block = g.block_ids[tok / g.block_size];
  const int64_t t = tok % g.block_size;
  float amax = 0.f;
  for (int64_t d = lane; d < g.dim; d += 32)
    amax = fmaxf(amax, fabsf(to_float(base[paged_offset(g, plane, block, t, h, d)])));
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = fmaxf(amax, 1e-8f) / 127.f;
  if (lane == 0) scale[row] = s;
  for (int64_t d = lane; d < g.dim; d += 32) {
    float v = rintf(to_float(base[paged_offset(g, plane, block, t, h, d)]) / s);
    v = fminf(fmaxf(v, -127.f), 127.f);
    q[row * g.dim + d] = static_cast<int8_t>(v);
  }
}

template <bool kGather>
int launch_copy(Geometry g, int elem_size, void* chunk, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(g.layers * 2 * g.n_blocks);
  if (grid == 0) return 0;
  switch (elem_size) {
    case 1: copy_kernel<uint8_t, kGather><<<grid, 256, 0, stream>>>(g, static_cast<uint8_t*>(chunk)); break;
    case 2: copy_kernel<uint16_t, kGather><<<grid, 256, 0, stream>>>(g, static_cast<uint16_t*>(chunk)); break;
    case 4: copy_kernel<uint32_t, kGather><<<grid, 256, 0, stream>>>(g, static_cast<uint32_t*>(chunk)); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int kvl_paged_gather(const int64_t* ptrs, const int64_t* strides, const int64_t* block_ids, int64_t n_blocks,
                     int64_t layers, int64_t block_size, int64_t heads, int64_t dim, int elem_size, void* out,
                     void* stream) {
  Geometry g{ptrs, strides, block_ids, n_blocks, layers, block_size, heads, dim};
  return launch_copy<true>(g, elem_size, out, static_cast<cudaStream_t>(stream));
}

int kvl_paged_scatter(const int64_t* ptrs, const int64_t* strides, const int64_t* block_ids, int64_t n_blocks,
                      int64_t layers, int64_t block_size, int64_t heads, int64_t dim, int elem_size, const void* src,
                      void* stream) {
  Geometry g{ptrs, strides, block_ids, n_blocks, layers, block_size, heads, dim};
  return launch_copy<false>(g, elem_size, const_cast<void*>(src), static_cast<cudaStream_t>(stream));
}

// dtype: 0 = float16, 1 = bfloat16, 2 = float32. q: [layers, 2, tokens, heads, dim] int8,
// scale: [layers, 2, tokens, heads] fp32.
int kvl_paged_gather_int8(const int64_t* ptrs, const int64_t* strides, const int64_t* block_ids, int64_t n_blocks,
                          int64_t layers, int64_t block_size, int64_t heads, int64_t dim, int dtype, int8_t* q,
                          float* scale, void* stream) {
  Geometry g{ptrs, strides, block_ids, n_blocks, layers, block_size, heads, dim};
  const int64_t rows = layers * 2 * n_blocks * block_size * heads;
  if (rows == 0) return 0;
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>((rows + threads / 32 - 1) / (threads / 32));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: gather_int8_kernel<__half><<<grid, threads, 0, s>>>(g, q, scale); break;
    case 1: gather_int8_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(g, q, scale); break;
    case 2: gather_int8_kernel<float><<<grid, threads, 0, s>>>(g, q, scale); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
