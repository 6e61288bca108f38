// The floor a Hadamard-rotated codec cannot go below on this CPU: the rotation alone, with no
// quantization arithmetic at all, against memcpy of the same bytes (benchmarks/rotation_floor.py
// builds and runs this; it includes the codec kernels' own helpers, so it measures their code).
//
//   rotation_floor <elements> <repeats>
//
// Prints one line per measured loop: "<name> <median seconds>". Every loop runs over the same
// <elements> fp16 values (a whole number of 64-element heads), on one thread, CPU-time clock,
// the loops interleaved in every repeat.
#include "codec.cpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

#if !defined(KVL_FAST64)
int main() {
  std::puts("unsupported: the codec's fast path needs AVX-512 (F, BW, DQ)");
  return 2;
}
#else
namespace {

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// fp16 -> fp32 registers -> fp16: the data movement every codec pays, no arithmetic.
__attribute__((noinline)) void convert(const uint16_t* a, uint16_t* b, size_t n) {
  for (size_t i = 0; i < n; i += 64) {
    __m512 v[4];
    for (int k = 0; k < 4; ++k) v[k] = load16(a, F16, i + 16 * k);
    for (int k = 0; k < 4; ++k) store16(v[k], F16, b, i + 16 * k, false);
  }
}

// The same plus the 64-point transform both directions of the codec apply (encode before
// quantizing, decode after dequantizing): the rotation's share of either.
__attribute__((noinline)) void rotate(const uint16_t* a, uint16_t* b, size_t n) {
  const Fw64 fw(0.125f);
  for (size_t i = 0; i < n; i += 64) {
    __m512 v[4];
    for (int k = 0; k < 4; ++k) v[k] = load16(a, F16, i + 16 * k);
    fwht64_regs(v, fw);
    for (int k = 0; k < 4; ++k) store16(v[k], F16, b, i + 16 * k, false);
  }
}

// What an int4 decode cannot avoid: packed 4-bit codes -> floats -> transform -> fp16, without
// the dequantization's multiply-add and without RoPE (so an upper bound on its speed).
__attribute__((noinline)) void decode4_floor(const uint8_t* codes, uint16_t* b, size_t n) {
  const Fw64 fw(0.125f);
  for (size_t i = 0; i < n; i += 64) {
    const uint8_t* row = codes + i / 2;
    __m512 v[4];
    for (int k = 0; k < 4; ++k) v[k] = codes16(row, 4, 16 * k);
    fwht64_regs(v, fw);
    for (int k = 0; k < 4; ++k) store16(v[k], F16, b, i + 16 * k, false);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fputs("usage: rotation_floor <elements> <repeats>\n", stderr);
    return 1;
  }
  const size_t n = std::strtoull(argv[1], nullptr, 10) / 64 * 64;
  const int repeats = std::atoi(argv[2]);
  std::vector<uint16_t> a(n), b(n);
  std::vector<uint8_t> codes(n / 2);
  for (size_t i = 0; i < n; ++i) a[i] = (uint16_t)(0x3C00 + (i * 2654435761u >> 20) % 0x0400);  // [1, 2)
  for (size_t i = 0; i < n / 2; ++i) codes[i] = (uint8_t)(i * 2654435761u >> 24);
  const char* names[] = {"memcpy", "convert", "rotate", "decode4_floor"};
  std::vector<double> t[4];
  for (int r = 0; r < repeats + 1; ++r) {  // the first round warms caches and pages, not counted
    double t0 = cpu_now();
    std::memcpy(b.data(), a.data(), n * 2);
    double t1 = cpu_now();
    convert(a.data(), b.data(), n);
    double t2 = cpu_now();
    rotate(a.data(), b.data(), n);
    double t3 = cpu_now();
    decode4_floor(codes.data(), b.data(), n);
    double t4 = cpu_now();
    if (r == 0) continue;
    t[0].push_back(t1 - t0);
    t[1].push_back(t2 - t1);
    t[2].push_back(t3 - t2);
    t[3].push_back(t4 - t3);
  }
  for (int k = 0; k < 4; ++k) {
    std::sort(t[k].begin(), t[k].end());
    std::printf("%s %.9f\n", names[k], t[k][t[k].size() / 2]);
  }
  return b[n / 3] == 0x7FFF;  // keeps the stores alive
}
#endif
