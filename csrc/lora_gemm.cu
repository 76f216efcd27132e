// The fused adapter GEMMs: a persistent bf16 GEMM for Hopper (sm_90a) with the adapter's down-
// and up-projection inside, so that a layer with R = 32 (PERA square r = 16) needs no merged
// weight:
//   forward  (lora_gemm_forward):  y = x W^T + bias + U B_gen^T,  U = x A_gen^T;
//   backward (lora_gemm_backward): gX = gY W + gU A_gen,          gU = gY B_gen.
// The kernel: C (M, N) = A (M, K) B (N, K)^T (or A Bkn for a (K, N) row-major Bkn: "MN-major
// B", the backward's W), fp32 accumulation, bf16 output. TMA loads with 128-byte swizzle into a
// 4-stage shared-memory ring, mbarriers (full / empty per stage), one producer warpgroup and two
// consumer warpgroups running wgmma m64n256k16 on 128 x 256 tiles, tiles handed out round-robin
// (in groups of 8 row blocks, for L2) over a grid of one CTA per SM. M % 128 == 0,
// N % 256 == 0, K % 64 == 0.
// - The U column: U = A Aadp^T (M, 32) as one more column of tiles; one U tile per row block, on
//   the CTAs with the fewest base tiles, each CTA's U tiles before its base tiles (Schedule).
// - The lora kernels (kLora): every base tile adds one k-block of U's rows times Bup's rows
//   (N, 32) after K, read by TMA once its row block's U tile published it through a per-row-block
//   flag (async-proxy fences, release / acquire); a cooperative launch keeps all CTAs
//   co-resident (see gemm_nt_kernel for the deadlock argument).
// - MN-major B (kBMn): Bkn loaded in 64 x 64 boxes, wgmma with imm-trans-b = 1 on an MN-major
//   128-byte-swizzle descriptor (see smem_desc); so is the extra k-block's Bup (32, N) there (the
//   backward's A_gen as it is stored); the U tiles stay K-major.
// - The U tiles' stages hold two k-blocks each (see consume_u_tile).
// - bias (N,), optional: added to the fp32 accumulators in the TMA-store epilogue.
// - Epilogue (kTmaStore): each consumer warpgroup converts its 64 x 256 accumulators to bf16 in
//   four 64 x 64 chunks, written (stmatrix) into one of two 8 KiB staging buffers of its own in
//   the 128-byte swizzle layout, and one thread stores each chunk with a TMA bulk-tensor store
//   that is only waited on (for its smem reads) before that buffer is written again, so the
//   global writes overlap the next tile's mainloop: 1.017x of cuBLAS's time, where storing
//   straight from registers took 1.12x (H100, 8192 x 4096 x 4096).
// The package instantiates two kernels, gemm_nt_kernel<32, true, false, true, false / true>; the
// template's other flags (kTmaStore = false, kCluster: 2-CTA clusters with B multicast, which
// measured 2.2x slower than cuBLAS) are not instantiated. adapter_core.cpp decides when the
// kernels run (docs/DESIGN.md). The device code is compiled for sm_90a only (other archs get a
// trap, and lora_gemm_available() says no).
// Builds for other archs than sm_90a compile the kernels to a trap, which leaves the device
// helpers unreferenced there: that warning (#177) says nothing in this file.
#pragma nv_diag_suppress 177
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include "common.h"

namespace {

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
constexpr int kConsumers = 2;                     // warpgroups, 64 rows of the tile each
constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
constexpr int kTileBytesA = BM * BK * 2, kTileBytesB = BN * BK * 2;

// TMA-store epilogue (kTmaStore): two 64 x 64 bf16 staging buffers (8 KiB, 128-byte swizzle,
// the layout of a 64 x 64 TMA box) per consumer warpgroup, 32 KiB in all. Chunks rather than a
// whole 128 x 256 tile (64 KiB) so that the ring keeps its 4 stages: 4 x 48 + 32 KiB + barriers +
// the 1 KiB alignment slack = 226 KiB, just under the 227 KiB limit, while 3 stages (to stage
// whole tiles) would shorten the mainloop's prefetch distance, the part measured closest to
// cuBLAS. 64 columns is also the widest box the 128-byte swizzle allows. Two buffers per
// warpgroup let a chunk's conversion run while the previous chunk's store still reads smem.
constexpr int kEpiCols = 64, kEpiBufs = 2;
template <bool kTmaStore>
struct EpilogueSmem {};  // no TMA store: nothing (an empty member; the layout is otherwise equal)
template <>
struct EpilogueSmem<true> {
  __nv_bfloat16 buf[kConsumers][kEpiBufs][64 * kEpiCols];
};

template <bool kTmaStore>
struct __align__(1024) Smem {
  __nv_bfloat16 A[STAGES][BM * BK];  // 16 KiB per stage, 1024-byte aligned (swizzle atoms)
  __nv_bfloat16 B[STAGES][BN * BK];  // 32 KiB per stage
  EpilogueSmem<kTmaStore> epi;       // 1024-byte aligned: follows the ring (192 KiB)
  uint64_t full[STAGES];
  uint64_t empty[STAGES];
};
static_assert(sizeof(Smem<true>) + 1024 <= 227 * 1024, "TMA-store epilogue exceeds 227 KiB smem");
static_assert((STAGES * (BM + BN) * BK * 2) % 1024 == 0, "staging buffers must be 1024-aligned");

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

// Spin until the barrier's phase `parity` completed. kClusterScope: acquiring at cluster scope
// (the empty barriers of the cluster kernels, arrived on by the peer's consumers).
template <bool kClusterScope = false>
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  while (!done) {
    if constexpr (kClusterScope)
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n"
          "}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n"
          "}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
  }
}

// 2-D TMA load of one box (inner coordinate c0 along K, outer c1 along rows) into shared memory,
// completing `bar`'s transaction count.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// ---- cluster (kCluster) ----
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// All threads of both CTAs of the cluster (not .aligned: reached after divergent code).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n"
               "barrier.cluster.wait.acquire;" ::: "memory");
}

// Arrive on the mbarrier at `bar`'s offset in the shared memory of cluster CTA `cta` (this CTA's
// own rank included), releasing this thread's prior accesses at cluster scope.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(bar)), "r"(cta));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote)
               : "memory");
}

// tma_load_2d into the same smem offset `dst` of every CTA in ctaMask, each completing the
// transaction count of its own mbarrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map,
                                                      uint64_t* bar, int c0, int c1,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// ---- TMA-store epilogue (kTmaStore) ----
// 2-D TMA store of one box from shared memory (this thread's bulk async-group).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int c0,
                                             int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(smem_u32(src)), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// At most N of this thread's bulk groups still reading their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
// All of this thread's bulk groups complete (their global writes done).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
// Generic-proxy smem writes made visible to the async proxy (the TMA store that reads them).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Named barrier over one warpgroup (ids 1, 2; 0 is __syncthreads').
__device__ __forceinline__ void warpgroup_bar(int id) {
  asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory");
}
// ---- gemm_nt_lora's hand-off of U between CTAs ----
// Ordering of this thread's generic-proxy accesses to global memory with its async-proxy ones
// (PTX fence.proxy.async with the .global state space). Used on both sides of the hand-off: by
// every thread that stored U rows with st.global (before the barrier that precedes the flag's
// release), and by the producer between its flag acquire and the TMA load that reads those rows.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}
// One more warpgroup's U rows of a row block are in global memory: the warpgroup's threads each
// fence their stores into the async proxy, meet at the warpgroup's named barrier, and thread 0
// adds 1 to the row block's flag with release semantics at gpu scope (cumulative: it releases
// the stores the barrier ordered before it). A row block is ready at kConsumers.
__device__ __forceinline__ void publish_u_rows(int* flag, int wg, int tid) {
  fence_proxy_async_global();
  warpgroup_bar(1 + wg);
  if (tid == 0) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(flag) : "memory");
}
// The producer: spin (acquire, gpu scope, with a capped exponential __nanosleep backoff) until
// the row block's flag reached `target`, then the proxy fence before the TMA load of U.
__device__ __forceinline__ void wait_u_rows(const int* flag, int target) {
  uint32_t ns = 32;
  for (;;) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
    if (v >= target) break;
    __nanosleep(ns);
    if (ns < 1024) ns *= 2;
  }
  fence_proxy_async_global();
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half (lower column)
  return *reinterpret_cast<const uint32_t*>(&v);
}
// Four 8 x 8 b16 matrices: lane l gives the address of row l % 8 of matrix l / 8; register i of
// every lane holds its two elements of matrix i in the mma fragment layout (row lane / 4,
// columns 2 (lane % 4) + 0, 1).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                            uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// MN-major B (gemm_nn, gemm_nn_lora: B given as Bkn (K, N), row-major): a stage's 256 x 64 B tile
// is four TMA boxes of 64 columns (along N, 128 bytes: the widest box the 128-byte swizzle allows)
// by 64 rows (along K), box j (columns n0 + 64 j ..) at byte 8192 j of the stage's B buffer. In a
// box, row k (one K index, 64 consecutive N values) lies at 128 k bytes, its 16-byte groups
// swizzled (group g at g ^ (k % 8)); the same 32 KiB per stage as the K-major tile.
constexpr int kBoxN = 64, kBoxBytesMn = kBoxN * BK * 2;
static_assert(kBoxN == BK && BN % kBoxN == 0, "Bkn boxes: make_map's BK-wide boxes, 4 per tile");

// wgmma shared-memory descriptor (PTX ISA, "Matrix Descriptor Format": start address, leading
// byte offset (LBO), stride byte offset (SBO), all >> 4; 128-byte swizzle = 1 in bits 62-63;
// base offset 0: every start below is 1024-byte aligned or, for K-major, inside a row of a
// 1024-aligned atom, as the existing K-major use has always done).
// K-major (kMn = false), the tile TMA wrote for a K-major operand: rows of 128 bytes (64 bf16
// along K), 8-row atoms of 1024 bytes. SBO = 1024, "the offset from the first 8 rows to the next 8
// rows" (K-major); LBO "not used, assumed to be 1" for swizzled K-major layouts. The k16 step
// moves the start 32 bytes along the row.
// MN-major (kMn = true, used with imm-trans-b = 1), the Bkn boxes above. PTX ISA 9.7.15.5.1.2.1
// ("Majorness supported by strides"), for MN-major swizzled layouts, in units of 128-bit elements
// (8 bf16 consecutive along N):
//   LBO: "offset from the first (swizzle-byte-size/16) rows to the next (swizzle-byte-size/16)
//        rows" = from the first 128 / 16 = 8 such elements (64 N values, one box row) to the next
//        64 N values = the distance between two boxes = 8192 bytes;
//   SBO: "offset from the first 8 columns to the next 8 columns" = from K rows k..k+7 (one
//        1024-byte swizzle atom) to k+8..k+15 = 8 x 128 = 1024 bytes.
// The same in CUTLASS's make_gmma_desc<Major::MN> (cute/atom/mma_traits_sm90_gmma.hpp): B128 is
// Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 bf16: 64 contiguous MN elements,
// m such blocks LBO apart; 8 K rows 128 bytes apart, k such groups SBO apart. An m64n256k16 B
// operand is m = 4 blocks (LBO used 3 times) by k = 2 groups (SBO once); the k16 step inside a
// 64-deep k-block moves the start by 16 K rows = 2048 bytes (two atoms: stays 1024-aligned).
template <bool kMn = false>
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_u32(p);
  uint64_t desc = (addr & 0x3FFFF) >> 4;                        // start address, 16-byte units
  desc |= uint64_t{kMn ? kBoxBytesMn >> 4 : 1} << 16;           // LBO
  desc |= uint64_t{1024 >> 4} << 32;                            // SBO: one 8-row atom
  desc |= uint64_t{1} << 62;                                    // 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// D (64 x 256, fp32, 128 registers per thread) (+)= A (64 x 16, smem) B^T (256 x 16, smem).
// kTransB: imm-trans-b, 0: B K-major, 1: B N-major ("If the value of the argument imm-trans-b is
// 1, then N-major is used for matrix B", PTX ISA 9.7.15.5.1.2; 16-bit types only: bf16 is).
template <int kTransB = 0>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                                 int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, %131;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransB));
}

// D (64 x 32, fp32, 16 registers per thread) (+)= A (64 x 16, smem) B^T (32 x 16, smem)
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                                int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "%16, %17, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// Tile t -> (first row, first column): tiles go down groups of kGroupM row blocks column by
// column, so the ~132 tiles in flight share kGroupM row blocks of A and ~17 column blocks of B
// (about 40 MiB at K = 4096: they stay in L2 even when B is larger than L2, e.g. N = 14336).
// With clusters the unit is a pair of vertically adjacent tiles (kUnitRows = 256, handed to one
// cluster), grouped by kGroupM / 2 pairs: the same 8 row blocks per group.
constexpr int kGroupM = 8;
template <int kUnitRows, int kGroup>
__device__ __forceinline__ void tile_origin(int tile, int units_m, int tiles_n, int& m0, int& n0) {
  const int per_group = kGroup * tiles_n;
  const int first_m = (tile / per_group) * kGroup;
  const int rows = min(units_m - first_m, kGroup);
  const int i = tile % per_group;
  m0 = (first_m + i % rows) * kUnitRows;
  n0 = (i / rows) * BN;
}

// This CTA's tile of work unit `unit` (a tile, or with clusters of kCtas a pair of vertically
// adjacent tiles, of which CTA rank `rank` takes the one at m0 + 128 rank).
template <int kCtas>
__device__ __forceinline__ void unit_origin(int unit, int units_m, int tiles_n, uint32_t rank,
                                            int& m0, int& n0) {
  tile_origin<BM * kCtas, kGroupM / kCtas>(unit, units_m, tiles_n, m0, n0);
  m0 += static_cast<int>(rank) * BM;
}

// Which tiles a CTA runs, in which order; producer and consumers walk the same list.
// Without kLora: units blockIdx.x / kCtas, + gridDim.x / kCtas, ... of the grouped raster
// (unit_origin; with kR = 32 the U column is each group's last column).
// kLora: the base tiles (tiles_m x N / 256) round-robin over the G CTAs in the
// grouped raster order, base tile b on CTA b % G, so that the first Bt % G CTAs get one base tile
// more than the others (the "light" CTAs, all G when Bt % G == 0); the tiles_m U tiles go to the
// light CTAs, U tile (row block) j on light CTA j % L, and every CTA runs its U tiles FIRST. At
// the main shape (1024 base tiles, 64 U tiles, 132 CTAs) CTAs 0-99 run 8 base tiles and CTAs
// 100-131 2 U tiles and 7 base tiles, so the U column does not lengthen the critical path
// (handing out U tiles with the base tiles, round-robin, gave CTAs 0-31 8 base tiles and a U
// tile).
template <bool kLora, int kCtas>
struct Schedule {
  int count;  // tiles (units) of this CTA
  int first, stride, units_m, tiles_n;  // without kLora
  int nu, ju, light, cta, grid, tiles_m, base_n, N;  // kLora
  __device__ __forceinline__ Schedule(int M, int N_, int kR) {
    const int tiles_m_ = M / BM;
    if constexpr (kLora) {
      tiles_m = tiles_m_, base_n = N_ / BN, N = N_;
      cta = blockIdx.x, grid = gridDim.x;
      const int base = tiles_m * base_n, rem = base % grid;
      light = grid - rem;
      ju = cta - rem;  // this CTA's first U tile, if it is a light one
      nu = ju >= 0 && ju < tiles_m ? (tiles_m - 1 - ju) / light + 1 : 0;
      const int nb = cta < base ? (base - 1 - cta) / grid + 1 : 0;
      count = nu + nb;
    } else {
      units_m = (tiles_m_ + kCtas - 1) / kCtas;
      tiles_n = N_ / BN + (kR > 0 ? 1 : 0);
      first = blockIdx.x / kCtas, stride = gridDim.x / kCtas;
      const int units = units_m * tiles_n;
      count = first < units ? (units - 1 - first) / stride + 1 : 0;
    }
  }
  // the i-th tile's origin (n0 == N: a U tile)
  __device__ __forceinline__ void origin(int i, uint32_t rank, int& m0, int& n0) const {
    if constexpr (kLora) {
      if (i < nu) {
        m0 = (ju + i * light) * BM;
        n0 = N;
      } else {
        tile_origin<BM, kGroupM>(cta + (i - nu) * grid, tiles_m, base_n, m0, n0);
      }
    } else {
      unit_origin<kCtas>(first + i * stride, units_m, tiles_n, rank, m0, n0);
    }
  }
};

// Hand a stage back to the producer(s) that refill it. Without clusters: this CTA's empty
// barrier (kConsumers arrivals). With clusters both CTAs' producers write into this CTA's stage
// (the peer multicasts its half of B into it), so the stage's consumers arrive on the empty
// barrier of both CTAs, kConsumers x 2 arrivals each.
template <bool kCluster>
__device__ __forceinline__ void release_stage(uint64_t* empty, uint32_t rank) {
  if constexpr (kCluster) {
    mbar_arrive_cluster(empty, rank);
    mbar_arrive_cluster(empty, rank ^ 1);
  } else {
    mbar_arrive(empty);
  }
}

// One k-block of a base tile's consumer warpgroup: wait for the stage, issue kSteps k16 MMAs of
// its 64 rows of A times the stage's 256 rows of B (accumulating unless `first`), keep
// this k-block's MMAs in flight and hand the previous k-block's stage (`prev`) back to the
// producer once the MMAs that read it are done. kBMn: the B buffer holds the MN-major boxes of a
// Bkn tile (see kBoxN), read with imm-trans-b = 1; else a K-major tile.
template <bool kCluster, int kSteps, bool kBMn = false, typename S>
__device__ __forceinline__ void consume_kblock(float (&d)[128], S& s, int wg, int tid,
                                               bool first, int& stage, uint32_t& phase,
                                               int& prev, uint32_t rank) {
  mbar_wait(&s.full[stage], phase);
  wgmma_fence();
  const __nv_bfloat16* a = s.A[stage] + wg * 64 * BK;  // this warpgroup's 64 rows
  const __nv_bfloat16* b = s.B[stage];
  // the k16 step along K: A (and K-major B) 16 bf16 = 32 bytes along the 128-byte row inside the
  // swizzle atom; MN-major B 16 rows of kBoxN bf16 = 2048 bytes
  constexpr int kStepB = kBMn ? 16 * kBoxN : 16;
#pragma unroll
  for (int k = 0; k < kSteps; ++k)
    wgmma_m64n256k16<kBMn ? 1 : 0>(d, smem_desc(a + k * 16), smem_desc<kBMn>(b + k * kStepB),
                                   (!first || k > 0));
  wgmma_commit();
  wgmma_wait<1>();  // the previous k-block's MMAs are done: its stage can be refilled
  if (prev >= 0 && tid == 0) release_stage<kCluster>(&s.empty[prev], rank);
  prev = stage;
  if (++stage == STAGES) { stage = 0; phase ^= 1; }
}

// One consumer warpgroup's share of a base tile (128 x 256; U tiles: consume_u_tile):
// consume_kblock over all k-blocks, one k-block of
// MMAs in flight. kExtra (gemm_nt_lora's base tiles): one more k-block after the K / 64 regular
// ones, whose stage holds U's 128 rows (A buffer) and Bup's 256 rows (B buffer), 32 columns each
// (columns 32..63 zero-filled by TMA): only its first two k16 MMAs are issued. kBMn (gemm_nn,
// gemm_nn_lora): every k-block reads B MN-major, the extra one's Bup (32, N) included.
template <bool kCluster, bool kExtra = false, bool kBMn = false, typename S>
__device__ __forceinline__ void consume_tile(float (&d)[128], S& s, int wg, int tid, int kblocks,
                                             int& stage, uint32_t& phase, uint32_t rank) {
  int prev = -1;
  for (int kb = 0; kb < kblocks; ++kb)
    consume_kblock<kCluster, BK / 16, kBMn>(d, s, wg, tid, kb == 0, stage, phase, prev, rank);
  if constexpr (kExtra)
    consume_kblock<kCluster, 2, kBMn>(d, s, wg, tid, false, stage, phase, prev, rank);
  wgmma_wait<0>();
  if (prev >= 0 && tid == 0) release_stage<kCluster>(&s.empty[prev], rank);
}

// The U tile's stages hold TWO k-blocks: the U tile moves A's whole row block
// (128 x K) and Aadp (32 x K) through the ring with only a few n32 MMAs per k-block, so it is
// bound by the bytes in flight (with one k-block per stage, 4 stages of 20 KiB, the 64 U tiles
// took 18 us per fused kernel against a predicted 3-10). A stage's 48 KiB hold two k-blocks' 40 KiB: k-block
// 2i in the A buffer with its Aadp rows at the start of the B buffer, k-block 2i + 1's Aadp rows
// after them (element offset kUPairB) and its A tile at element offset kUPairA of the B buffer
// (1024-byte aligned, as the 128-byte swizzle needs). The last stage holds one k-block when
// K / 64 is odd.
constexpr int kUPairB = 32 * BK, kUPairA = BM * BK;  // element offsets into the B buffer
static_assert(2 * kUPairB * 2 <= kUPairA * 2 && kUPairA + BM * BK <= BN * BK,
              "two k-blocks of a U tile fit one stage's B buffer");

// One consumer warpgroup's share of a U tile (kR = 32): per stage two k-blocks (one for the last
// stage when `kblocks` is odd), 4 k16 MMAs each, one stage of MMAs in flight.
template <bool kCluster, typename S>
__device__ __forceinline__ void consume_u_tile(float (&d)[16], S& s, int wg, int tid,
                                               int kblocks, int& stage, uint32_t& phase,
                                               uint32_t rank) {
  int prev = -1;
  for (int kb = 0; kb < kblocks; kb += 2) {
    mbar_wait(&s.full[stage], phase);
    wgmma_fence();
    const __nv_bfloat16* a0 = s.A[stage] + wg * 64 * BK;
    const __nv_bfloat16* b0 = s.B[stage];
#pragma unroll
    for (int k = 0; k < BK / 16; ++k)
      wgmma_m64n32k16(d, smem_desc(a0 + k * 16), smem_desc(b0 + k * 16), (kb > 0 || k > 0));
    if (kb + 1 < kblocks) {
      const __nv_bfloat16* a1 = s.B[stage] + kUPairA + wg * 64 * BK;
      const __nv_bfloat16* b1 = s.B[stage] + kUPairB;
#pragma unroll
      for (int k = 0; k < BK / 16; ++k)
        wgmma_m64n32k16(d, smem_desc(a1 + k * 16), smem_desc(b1 + k * 16), true);
    }
    wgmma_commit();
    wgmma_wait<1>();
    if (prev >= 0 && tid == 0) release_stage<kCluster>(&s.empty[prev], rank);
    prev = stage;
    if (++stage == STAGES) { stage = 0; phase ^= 1; }
  }
  wgmma_wait<0>();
  if (prev >= 0 && tid == 0) release_stage<kCluster>(&s.empty[prev], rank);
}

// The accumulators of consume_tile into out (row-major, leading dimension ld) at (row0, col0):
// the m64nNk16 layout, two bf16 per 32-bit store.
template <int kWidth, int kRegs>
__device__ __forceinline__ void store_tile(const float (&d)[kRegs], __nv_bfloat16* out,
                                           int64_t ld, int row0, int col0, int tid) {
  const int warp = tid / 32, lane = tid % 32;
  const int64_t row = row0 + warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kWidth / 8; ++j) {
    const int col = col0 + j * 8 + 2 * (lane % 4);
    *reinterpret_cast<__nv_bfloat162*>(out + row * ld + col) =
        __floats2bfloat162_rn(d[4 * j + 0], d[4 * j + 1]);
    *reinterpret_cast<__nv_bfloat162*>(out + (row + 8) * ld + col) =
        __floats2bfloat162_rn(d[4 * j + 2], d[4 * j + 3]);
  }
}

// Variant 1, 3: a warpgroup's 64 x 256 accumulators into C at (row0, col0) through its two
// staging buffers, in four 64 x 64 chunks, chunk c through buffer c % 2. Before a buffer is
// written, the TMA store that last read it (two chunks earlier, possibly in the previous tile)
// must have finished reading: thread 0 waits until at most one of its bulk groups (the other
// buffer's) is pending, then the warpgroup's named barrier publishes that. The chunk is written
// with stmatrix in the 128-byte swizzle layout (row r at r * 128 bytes, its 16-byte column group
// g at g ^ (r % 8)): each 8 x 8 matrix covers 8 rows x 16 bytes with 8 distinct swizzled groups,
// so every phase hits all 32 banks once. Each thread fences its writes into the async proxy, a
// second barrier gathers the warpgroup, thread 0 issues the store and commits it; nobody waits
// for it here (the last two chunks' stores overlap the next tile's mainloop).
// bias (N,) bf16 or nullptr: added to the fp32 accumulators before their one rounding. A thread's
// accumulators cover 2 adjacent columns in each of the tile's 32 8-column groups (cols 8 j +
// 2 (lane % 4) + 0, 1, rows lane / 4 and + 8: both rows take the same pair), so it reads those
// 64 bias values, once per tile, as one 4-byte load per group straight from global memory (L2 /
// L1: the 512 bytes of the tile's columns, the same addresses for the 8 lanes of a warp that
// share lane % 4 and for all 8 warps), a chunk's 8 pairs issued one chunk ahead so that their
// latency overlaps the previous chunk's conversion and the barriers. nullptr: no load, the pairs
// are +0, and x + 0 = x (up to the sign of a zero): C is what it was without bias.
__device__ __forceinline__ void load_bias_pairs(uint32_t (&b)[kEpiCols / 8],
                                                const __nv_bfloat16* bias, int col) {
#pragma unroll
  for (int i = 0; i < kEpiCols / 8; ++i)
    b[i] = bias ? __ldg(reinterpret_cast<const unsigned int*>(bias + col + 8 * i)) : 0u;
}
// bf16x2(lo + bias pair's low half, hi + its high half)
__device__ __forceinline__ uint32_t pack_bias(float lo, float hi, uint32_t b) {
  return pack_bf16(lo + __uint_as_float(b << 16), hi + __uint_as_float(b & 0xFFFF0000u));
}
template <typename S>
__device__ __forceinline__ void store_tile_tma(const float (&d)[128], S& s,
                                               const CUtensorMap* map_c, int wg, int tid,
                                               int row0, int col0, const __nv_bfloat16* bias) {
  const int warp = tid / 32, lane = tid % 32;
  const int mat = lane / 8;                             // the matrix this lane addresses
  const int row = warp * 16 + (mat & 1) * 8 + lane % 8;  // its row within the 64-row chunk
  const uint32_t sw = row % 8;                          // == lane % 8
  const int bias_col = col0 + 2 * (lane % 4);           // this thread's first column
  uint32_t bias_cur[kEpiCols / 8], bias_next[kEpiCols / 8] = {};
  load_bias_pairs(bias_cur, bias, bias_col);
#pragma unroll
  for (int c = 0; c < BN / kEpiCols; ++c) {
    if (c + 1 < BN / kEpiCols) load_bias_pairs(bias_next, bias, bias_col + (c + 1) * kEpiCols);
    const __nv_bfloat16* buf = s.epi.buf[wg][c % kEpiBufs];
    if (tid == 0) bulk_wait_read<kEpiBufs - 1>();
    warpgroup_bar(1 + wg);
    const uint32_t row_addr = smem_u32(buf) + row * 128;
#pragma unroll
    for (int q = 0; q < kEpiCols / 16; ++q) {  // 16 columns = two 8-column groups per stmatrix
      const int j = c * (kEpiCols / 8) + 2 * q;  // the first 8-column group, of the tile's 32
      const uint32_t group = 2 * q + (mat >> 1);  // this lane's 16-byte group within the row
      const uint32_t b0 = bias_cur[2 * q], b1 = bias_cur[2 * q + 1];  // groups j, j + 1
      stmatrix_x4(row_addr + ((group ^ sw) << 4), pack_bias(d[4 * j + 0], d[4 * j + 1], b0),
                  pack_bias(d[4 * j + 2], d[4 * j + 3], b0),
                  pack_bias(d[4 * j + 4], d[4 * j + 5], b1),
                  pack_bias(d[4 * j + 6], d[4 * j + 7], b1));
    }
#pragma unroll
    for (int i = 0; i < kEpiCols / 8; ++i) bias_cur[i] = bias_next[i];
    fence_proxy_async_smem();
    warpgroup_bar(1 + wg);
    if (tid == 0) {
      tma_store_2d(map_c, buf, col0 + c * kEpiCols, row0);
      bulk_commit();
    }
  }
}

// kR = 0: C = A B^T. kR = 32: also U = A Aadp^T (M, 32), computed by one extra column of tiles
// (n0 == N) that loads A's tiles again (from L2: the group's other tiles just read them) and
// Aadp's 32 rows, and runs wgmma n32: the adapter's down-projection fused into the base GEMM.
// kTmaStore: store_tile_tma for the C tiles. kCluster: launched in
// clusters of 2 along x; the cluster takes tile pairs (m0, n0), (m0 + 128, n0), CTA rank r the
// tile at m0 + 128 r, and each CTA's producer loads its A tile and B rows n0 + 128 r .. + 127,
// multicast into both CTAs. Every CTA's full barrier expects A + all of B (its own half and the
// peer's); a stage is refilled only when the consumers of both CTAs have released it (the empty
// barrier counts 2 x 2 arrivals). Both CTAs of a cluster run the same pairs, hence the same
// sequence of (stage, phase) uses; a peer's multicast into a stage of this CTA can only start
// after this CTA's consumers released that stage, i.e. after the full barrier's previous phase
// completed, so its bytes always land in the phase this CTA's producer arms.
//
// kLora (gemm_nt_lora; kR = 32, TMA store, no clusters): C = A B^T + U Bup^T with U = bf16(A
// Aadp^T) computed in the same launch, in one fp32 accumulator, without merging W + Bup Aadp.
// The U tiles are scheduled as Schedule says; the U tile's consumers store U and
// publish its row block (publish_u_rows: a per-row-block counter, ready at kConsumers); every
// base tile runs one extra k-block (U's 128 rows x Bup's 256 rows, 32 columns, see consume_tile)
// whose TMA load the producer issues only after wait_u_rows on its row block's counter.
// Deadlock freedom. (a) Each CTA runs its U tiles before any of its base tiles (Schedule),
// producer and consumers alike, and U tiles never wait on a flag: their loads need only stages
// that this CTA's own consumers release, as in any GEMM. (b) All CTAs are co-resident
// (cooperative launch, grid <= SMs, one CTA per SM; see launch). So every CTA gets through its U
// tiles and publishes their flags; every flag a base tile's producer spins on is then published
// eventually, and the base tiles complete as in a plain GEMM. Without (b) a CTA spinning for a
// U tile owned by a CTA that is not yet resident (it waits for this one's SM, or for another
// stream's kernel) hangs.
struct LoraArgs {
  CUtensorMap u;    // U (M, 32) as an A operand: 128 x 64 boxes, columns 32..63 out of bounds
  CUtensorMap bup;  // Bup (N, 32) as a B operand: 256 x 64 boxes, likewise
  int* flags;       // M / 128 counters, zeroed before the launch
};

//
// kBMn (gemm_nn, gemm_nn_lora; TMA store, no clusters): map_b is Bkn (K, N) row-major in 64 x 64
// boxes and the base tiles' K / 64 regular k-blocks load and read B MN-major (kBoxN, smem_desc,
// imm-trans-b); the U tiles (Aadp (32, K)) and the extra k-block (Bup (N, 32)) stay K-major.
// bias (N,) or nullptr: added in store_tile_tma (kTmaStore only).
template <int kR, bool kTmaStore, bool kCluster, bool kLora = false, bool kBMn = false>
__global__ void __launch_bounds__(kThreads, 1)
gemm_nt_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
               const __grid_constant__ CUtensorMap map_u, const __grid_constant__ CUtensorMap map_c,
               const __grid_constant__ LoraArgs lora, __nv_bfloat16* __restrict__ C,
               __nv_bfloat16* __restrict__ U, const __nv_bfloat16* __restrict__ bias, int M, int N,
               int K) {
  static_assert(kR == 0 || kR == 32, "the U column is 32 wide");
  static_assert(!kLora || (kR == 32 && kTmaStore && !kCluster), "lora kernels: kR 32, TMA store, no cluster");
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another arch: never launched (lora_gemm_available checks the binary)
#else
  static_assert(!kBMn || (kTmaStore && !kCluster), "MN-major B: TMA store, no cluster");
  using S = Smem<kTmaStore>;
  constexpr int kCtas = kCluster ? 2 : 1;  // CTAs per cluster = tiles per work unit
  extern __shared__ uint8_t smem_raw[];
  S& s = *reinterpret_cast<S*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const int wg = threadIdx.x / 128;  // 0, 1: consumers; 2: producer
  const int tid = threadIdx.x % 128;
  const uint32_t rank = kCluster ? cluster_ctarank() : 0;
  const int kblocks = K / BK;
  // work units (tiles, or tile pairs for a cluster; both CTAs of a cluster iterate the same units,
  // the launch makes gridDim.x even), in Schedule's order
  const Schedule<kLora, kCtas> sched(M, N, kR);
  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], kConsumers * kCtas);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // the peer's producer and consumers use this CTA's barriers: both CTAs' inits must be visible
  // cluster-wide before anyone arrives, waits or multicasts
  if constexpr (kCluster) cluster_sync(); else __syncthreads();

  if (wg == kConsumers) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int unit = 0; unit < sched.count; ++unit) {
        int m0, n0;
        sched.origin(unit, rank, m0, n0);
        // cluster, M / 128 odd: the last pair's second tile lies below M; it loads the first
        // tile's rows (its consumers compute and store nothing) so that it still runs the
        // cluster's pipeline (its half of B, its barrier arrivals)
        const int a_row = kCluster ? min(m0, M - BM) : m0;
        const bool u_tile = kR > 0 && n0 == N;
        const int extra = kLora && !u_tile ? 1 : 0;  // gemm_nt_lora: the U Bup^T k-block
        // a U tile's stage holds two k-blocks (see consume_u_tile)
        for (int kb = 0; kb < kblocks + extra; kb += u_tile ? 2 : 1) {
          mbar_wait<kCluster>(&s.empty[stage], phase ^ 1);
          if (u_tile) {  // A's tiles and Aadp's kR rows (see kUPairA, kUPairB)
            const bool two = kb + 1 < kblocks;
            mbar_expect_tx(&s.full[stage], (two ? 2 : 1) * (kTileBytesA + kR * BK * 2));
            tma_load_2d(s.A[stage], &map_a, &s.full[stage], kb * BK, a_row);
            tma_load_2d(s.B[stage], &map_u, &s.full[stage], kb * BK, 0);
            if (two) {
              tma_load_2d(s.B[stage] + kUPairA, &map_a, &s.full[stage], (kb + 1) * BK, a_row);
              tma_load_2d(s.B[stage] + kUPairB, &map_u, &s.full[stage], (kb + 1) * BK, 0);
            }
          } else {
            // the extra k-block: U's rows m0.. (published by another CTA's, or this CTA's,
            // consumers) and Bup's rows n0.., both from column 0. Its expected bytes are the
            // full boxes: TMA writes (and counts) the whole box, the zero-filled out-of-bounds
            // columns 32..63 included.
            const bool lora_kb = kLora && kb == kblocks;
            if (lora_kb) wait_u_rows(lora.flags + m0 / BM, kConsumers);
            const int c0 = lora_kb ? 0 : kb * BK;
            mbar_expect_tx(&s.full[stage], kTileBytesA + kTileBytesB);  // all of B, both halves
            tma_load_2d(s.A[stage], lora_kb ? &lora.u : &map_a, &s.full[stage], c0, a_row);
            if constexpr (kCluster) {
              constexpr int kHalf = BN / 2;  // map_b's box is 128 rows here
              tma_load_2d_multicast(s.B[stage] + rank * kHalf * BK, &map_b, &s.full[stage],
                                    c0, n0 + static_cast<int>(rank) * kHalf, 0x3);
            } else if (kBMn) {  // Bkn rows c0.. (K), columns n0.. (N): 4 boxes; the extra
              // k-block's Bup is (32, N) row-major too, MN-major like Bkn (rows 32..63 of its
              // 64-row boxes zero-filled)
              const CUtensorMap* mkn = lora_kb ? &lora.bup : &map_b;
#pragma unroll
              for (int j = 0; j < BN / kBoxN; ++j)
                tma_load_2d(s.B[stage] + j * kBoxN * BK, mkn, &s.full[stage], n0 + j * kBoxN, c0);
            } else {
              tma_load_2d(s.B[stage], lora_kb ? &lora.bup : &map_b, &s.full[stage], c0, n0);
            }
          }
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    float d[128];
    int stage = 0;
    uint32_t phase = 0;
    for (int unit = 0; unit < sched.count; ++unit) {
      int m0, n0;
      sched.origin(unit, rank, m0, n0);
      const bool stored = !kCluster || m0 < M;  // see a_row above
      if constexpr (kR > 0) {
        if (n0 == N) {  // the U tile: (128 x 32) = A's row block times Aadp^T
          float du[16];
          consume_u_tile<kCluster>(du, s, wg, tid, kblocks, stage, phase, rank);
          if (stored) store_tile<kR>(du, U, kR, m0 + wg * 64, 0, tid);
          if constexpr (kLora) publish_u_rows(lora.flags + m0 / BM, wg, tid);
          continue;
        }
      }
      consume_tile<kCluster, kLora, kBMn>(d, s, wg, tid, kblocks, stage, phase, rank);
      if (stored) {
        if constexpr (kTmaStore) store_tile_tma(d, s, &map_c, wg, tid, m0 + wg * 64, n0, bias);
        else store_tile<BN>(d, C, N, m0 + wg * 64, n0, tid);
      }
    }
    // the staging buffers' last stores: done (global writes included) before the CTA exits
    if constexpr (kTmaStore) {
      if (tid == 0) bulk_wait_all();
    }
  }
  // no CTA leaves while its peer may still arrive on its empty barriers (the peer's consumers
  // release every stage in both CTAs); the peer's multicasts into this CTA all completed before
  // this CTA's consumers got past the last full barrier. (__syncwarp: the producer warp's lane 0
  // reconverges with the lanes that skipped its loop before the warp meets the cluster barrier.)
  if constexpr (kCluster) {
    __syncwarp();
    cluster_sync();
  }
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                    cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                "polykern lora_gemm: cuTensorMapEncodeTiled not found in the driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A (rows, K) K-major bf16 matrix as a TMA map with boxes of box_rows x 64, 128-byte swizzle.
CUtensorMap make_map(const at::Tensor& t, uint32_t box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(t.size(1)),
                              static_cast<cuuint64_t>(t.size(0))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(t.stride(0)) * 2};
  const cuuint32_t box[2] = {BK, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, t.data_ptr(), dims,
                                 strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "polykern lora_gemm: cuTensorMapEncodeTiled failed with ", int(r));
  return map;
}

}  // namespace

namespace {
// T: bf16 on A's device, 2-D with `cols` columns (A's K when -1), unit stride along its rows,
// 16-byte aligned rows and start (TMA's requirements on the global address and strides).
void check_operand(const at::Tensor& T, const at::Tensor& A, const char* name,
                   int64_t cols = -1) {
  if (cols < 0) cols = A.size(1);
  TORCH_CHECK(T.is_cuda() && T.device() == A.device(), "polykern lora_gemm: ", name,
              " must be a CUDA tensor on A's device");
  TORCH_CHECK(T.scalar_type() == at::kBFloat16, "polykern lora_gemm: ", name, " must be bf16, got ",
              T.scalar_type());
  TORCH_CHECK(T.dim() == 2 && T.size(1) == cols, "polykern lora_gemm: ", name, " must be 2-D with ",
              cols, " columns");
  TORCH_CHECK(T.stride(1) == 1 && (T.stride(0) * 2) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(T.data_ptr()) % 16 == 0,
              "polykern lora_gemm: ", name, " needs unit stride along its rows (along K; along N"
              " for Bkn) and 16-byte aligned rows");
}
}  // namespace

namespace {
// A launch's arguments (gemm_nt_impl fills them once; every instantiation takes the same).
struct LaunchArgs {
  CUtensorMap ma, mb, mu, mc;
  LoraArgs lora;
  __nv_bfloat16 *c, *u;
  const __nv_bfloat16* bias;  // nullptr: none
  int M, N, K;
  cudaStream_t stream;
};

// One launch of gemm_nt_kernel<kR, kTmaStore, kCluster, kLora, kBMn>, through cudaLaunchKernelEx.
// Without clusters: min(tiles, SMs) CTAs. With clusters: an even grid of 2 x min(tile pairs, the
// clusters that fit on the device at once (cudaOccupancyMaxActiveClusters: a 2-CTA cluster needs
// two free SMs of one GPC, so fewer than SMs / 2 may fit, and a second wave would cost a whole
// tile time), SMs / 2) CTAs, with a (2, 1, 1) cluster dimension. kLora: a cooperative launch
// (cudaLaunchAttributeCooperative), which either makes all CTAs co-resident or fails with an
// error (cudaErrorCooperativeLaunchTooLarge), never runs them in waves; with one CTA per SM
// (the ~226 KiB of shared memory) grid <= SMs always fits an otherwise idle device, and beside
// other streams' kernels the launch waits for the SMs rather than starting a part of the grid.
template <int kR, bool kTmaStore, bool kCluster, bool kLora = false, bool kBMn = false>
void launch(const LaunchArgs& L) {
  auto* kernel = gemm_nt_kernel<kR, kTmaStore, kCluster, kLora, kBMn>;
  const int M = L.M, N = L.N;
  const size_t smem = sizeof(Smem<kTmaStore>) + 1024;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles_m = M / BM, tiles_n = N / BN + (kR > 0 ? 1 : 0);
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = L.stream;
  cfg.attrs = attr;
  if constexpr (!kCluster) {
    const int64_t tiles = tiles_m * tiles_n;
    cfg.gridDim = dim3(static_cast<unsigned>(tiles < sms ? tiles : sms), 1, 1);
    if constexpr (kLora) {
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.numAttrs = 1;
    }
  } else {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(2, 1, 1);
    cfg.numAttrs = 1;
    static int max_clusters[64] = {};  // per device, queried once
    const int dev = at::cuda::current_device();
    TORCH_CHECK(dev >= 0 && dev < 64, "polykern lora_gemm: device index ", dev, " out of range");
    if (max_clusters[dev] == 0) {
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &cfg));
      TORCH_CHECK(n > 0, "polykern lora_gemm: no 2-CTA cluster of this kernel fits on the device");
      max_clusters[dev] = n;
    }
    const int64_t units = (tiles_m + 1) / 2 * tiles_n;
    int64_t clusters = std::min<int64_t>({units, max_clusters[dev], std::max(1, sms / 2)});
    cfg.gridDim = dim3(static_cast<unsigned>(2 * clusters), 1, 1);
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, L.ma, L.mb, L.mu, L.mc, L.lora, L.c, L.u,
                                    L.bias, M, N, L.K));
}

}  // namespace

namespace {
// (C, U) = (A B^T + U Bup^T (+ bias), U = A Aadp^T) for A (M, K), B (N, K), Aadp (32, K),
// Bup (N, 32), all bf16 CUDA with unit stride along K. bmn: B is Bkn (K, N) row-major and Bup
// (32, N) (MN-major), C = A Bkn + U Bup (+ bias). bias (N,) or undefined: added before the
// rounding. C and U are poisoned first under POLYKERN_POISON (tests).
std::tuple<at::Tensor, at::Tensor> lora_gemm_impl(const at::Tensor& A, const at::Tensor& B,
                                                  const at::Tensor& Aadp, const at::Tensor& Bup,
                                                  const at::Tensor& bias, bool bmn) {
  TORCH_CHECK(A.is_cuda() && A.scalar_type() == at::kBFloat16 && A.dim() == 2,
              "polykern lora_gemm: A must be a 2-D bf16 CUDA tensor, got ", A.scalar_type(), " ",
              A.dim(), "-D on ", A.device());
  check_operand(A, A, "A");
  if (bmn) {
    TORCH_CHECK(B.dim() == 2 && B.size(0) == A.size(1), "polykern lora_gemm: Bkn must be 2-D (K, N) with"
                " A's K = ", A.size(1), " rows, got ", B.sizes());
    check_operand(B, A, "Bkn", B.size(1));
  } else {
    check_operand(B, A, "B");
  }
  const int64_t M = A.size(0), N = B.size(bmn ? 1 : 0), K = A.size(1);
  TORCH_CHECK(M % BM == 0 && N % BN == 0 && K % BK == 0 && K > 0,
              "polykern lora_gemm: M % 128, N % 256 and K % 64 must be 0, got ", M, " ", N, " ", K);
  check_operand(Aadp, A, "Aadp");
  TORCH_CHECK(Aadp.size(0) == 32, "polykern lora_gemm: Aadp must have 32 rows, got ", Aadp.size(0));
  if (bmn) {  // MN-major like Bkn: (32, N) row-major
    check_operand(Bup, A, "Bup", N);
    TORCH_CHECK(Bup.size(0) == 32, "polykern lora_gemm: with Bkn, Bup must be (32, N) = (32, ",
                N, "), got ", Bup.sizes());
  } else {
    check_operand(Bup, A, "Bup", 32);
    TORCH_CHECK(Bup.size(0) == N, "polykern lora_gemm: Bup must have B's N = ", N,
                " rows, got ", Bup.size(0));
  }
  if (bias.defined()) {
    TORCH_CHECK(bias.is_cuda() && bias.device() == A.device() &&
                    bias.scalar_type() == at::kBFloat16 && bias.dim() == 1 && bias.size(0) == N,
                "polykern lora_gemm: bias must be a 1-D bf16 CUDA tensor of N = ", N,
                " elements on A's device, got ", bias.scalar_type(), " ", bias.sizes());
    TORCH_CHECK((bias.stride(0) == 1 || N <= 1) &&
                    reinterpret_cast<uintptr_t>(bias.data_ptr()) % 4 == 0,
                "polykern lora_gemm: bias needs unit stride and a 4-byte aligned start");
  }
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor C = at::empty({M, N}, A.options());
  at::Tensor U = at::empty({M, 32}, A.options());
  // POLYKERN_POISON=1 (tests): NaN first, so an element never written shows
  polykern::maybe_poison(C);
  polykern::maybe_poison(U);
  if (M == 0) return {C, U};
  LaunchArgs L = {};
  // Bkn: 64 x 64 boxes (64 columns along N, make_map's inner box width BK, by 64 rows along K)
  L.ma = make_map(A, BM);
  L.mb = N == 0 ? L.ma : make_map(B, bmn ? BK : BN);
  L.mu = make_map(Aadp, 32);
  // the TMA store's map: C in 64 x 64 boxes, 128-byte swizzle (the staging buffers' layout)
  L.mc = N > 0 ? make_map(C, kEpiCols) : L.ma;
  L.c = reinterpret_cast<__nv_bfloat16*>(C.data_ptr());
  L.u = reinterpret_cast<__nv_bfloat16*>(U.data_ptr());
  L.bias = bias.defined() ? reinterpret_cast<const __nv_bfloat16*>(bias.data_ptr()) : nullptr;
  L.stream = at::cuda::getCurrentCUDAStream();
  L.M = static_cast<int>(M), L.N = static_cast<int>(N), L.K = static_cast<int>(K);
  // U as the extra k-block's A operand, Bup as its B operand (boxes of 64 columns over 32-column
  // tensors: TMA zero-fills columns 32..63; the encode has no box <= dims rule), and the row
  // blocks' flags. Zeroed per call with cudaMemsetAsync on the launch's stream (a
  // 4 * M / 128-byte memset node) rather than an epoch: a fresh at::empty block may hold any int,
  // the current epoch included (a false "ready": C silently wrong), and a persistent flag buffer
  // with an epoch would be shared by calls on different streams that run at the same time.
  at::Tensor flags = at::empty({M / BM}, A.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(flags.data_ptr(), 0, flags.nbytes(), L.stream));
  L.lora.u = make_map(U, BM);
  // N == 0: no base tiles, never read. With Bkn, Bup (32, N) in Bkn's 64 x 64 boxes.
  L.lora.bup = N == 0 ? L.ma : make_map(Bup, bmn ? BK : BN);
  L.lora.flags = flags.data_ptr<int>();
  if (bmn)
    launch<32, true, false, true, true>(L);
  else
    launch<32, true, false, true>(L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {C, U};
}
}  // namespace

// ---- the package's entry points (adapter_core.cpp) --------------------------------------------
namespace polykern {

// Whether the lora kernels can run on CUDA device `dev`: a 9.0 device and a binary of this file
// built for it (sm_90a; a build for other archs only has the trap). Cached per device. The
// binary's version says 90 for sm_90 and sm_90a alike, and an sm_90 (or compute_90 PTX) build
// has the trap: so only a build whose arch list has sm_90a and no plain sm_90 (POLYKERN_SM90A,
// set by setup.py and CMakeLists.txt) takes the kernels at all.
bool lora_gemm_available(int dev) {
#ifndef POLYKERN_SM90A
  (void)dev;
  return false;
#endif
  static std::atomic<int> cache[64];  // 0 unknown, 1 yes, 2 no
  if (dev < 0 || dev >= 64) return false;
  int v = cache[dev].load();
  if (v == 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
    const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, gemm_nt_kernel<32, true, false, true, true>);
    if (e != cudaSuccess) (void)cudaGetLastError();  // no binary for this device: not an error
    v = (p->major == 9 && p->minor == 0 && e == cudaSuccess && attr.binaryVersion == 90) ? 1 : 2;
    cache[dev].store(v);
  }
  return v == 1;
}

// (y, U) = (x W^T + bias + U B^T, x A^T) for x (N, n), W (m, n), A (32, n), B (m, 32), bias (m,)
// or absent; all bf16, contiguous, the shapes the kernel takes (adapter_core.cpp's fused_takes).
std::tuple<at::Tensor, at::Tensor> lora_gemm_forward(const at::Tensor& x, const at::Tensor& W,
                                                     const at::Tensor& A, const at::Tensor& B,
                                                     const std::optional<at::Tensor>& bias) {
  return lora_gemm_impl(x, W, A, B, bias.value_or(at::Tensor()), false);
}

// (gX, gU) = (gY W + gU A, gY Bt^T) for gY (N, m), W (m, n), Bt = B^T (32, m), A (32, n): the
// backward's gX = gY W + gU A with gU = gY B, W and A read in place (MN-major).
std::tuple<at::Tensor, at::Tensor> lora_gemm_backward(const at::Tensor& gy, const at::Tensor& W,
                                                      const at::Tensor& Bt, const at::Tensor& A) {
  return lora_gemm_impl(gy, W, Bt, A, at::Tensor(), true);
}

}  // namespace polykern
