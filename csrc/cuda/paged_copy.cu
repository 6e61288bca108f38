// kvlayer paged <-> chunk copies for CUDA: gather and scatter of whole chunks, all layers at once.
//
// Plain C launchers (no torch headers), called from kvlayer/ops.py through ctypes, so the
// library does not depend on torch's C++ ABI. Every layer's K and V are described by a base
// address plus (block, token, head, dim) strides in elements: any attention backend's layout
// that a layout adapter can express as strided views works unchanged. The chunk side is the
// canonical contiguous [layers, 2, n_blocks * block_size, heads, dim].
//
// Built with codec.cu into one library by kvlayer/codec/cuda.py (cached by source hash).
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

}  // extern "C"
