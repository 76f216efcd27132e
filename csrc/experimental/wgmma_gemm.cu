// EXPERIMENTAL, not built by setup.py (plan for version 12, item 1: a base GEMM of our own into
// which the adapter's passes can later be fused). A persistent bf16 GEMM for Hopper (sm_90a):
// C (M, N) = A (M, K) B (N, K)^T, both operands K-major (row-major with unit stride along K),
// fp32 accumulation, bf16 output. TMA loads with 128-byte swizzle into a 4-stage shared-memory
// ring, mbarriers (full / empty per stage), one producer warpgroup and two consumer warpgroups
// running wgmma m64n256k16, one 128 x 256 output tile per CTA at a time, tiles handed out
// round-robin (in groups of 8 row blocks, for L2) over a grid of one CTA per SM.
// M % 128 == 0, N % 256 == 0, K % 64 == 0.
// Built and checked on the device by bench/wgmma_gemm_check.py (torch.utils.cpp_extension.load,
// registered as torch.ops.polykern_exp.gemm_nt).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
constexpr int kConsumers = 2;                     // warpgroups, 64 rows of the tile each
constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
constexpr int kTileBytesA = BM * BK * 2, kTileBytesB = BN * BK * 2;

struct __align__(1024) Smem {
  __nv_bfloat16 A[STAGES][BM * BK];  // 16 KiB per stage, 1024-byte aligned (swizzle atoms)
  __nv_bfloat16 B[STAGES][BN * BK];  // 32 KiB per stage
  uint64_t full[STAGES];
  uint64_t empty[STAGES];
};

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

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  while (!done) {
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

// wgmma shared-memory descriptor of a K-major tile in the 128-byte swizzle layout TMA wrote:
// rows of 128 bytes (64 bf16 along K), 8-row atoms of 1024 bytes (the stride byte offset).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_u32(p);
  uint64_t desc = (addr & 0x3FFFF) >> 4;  // start address, 16-byte units
  desc |= uint64_t{1} << 16;              // leading byte offset (unused with this swizzle)
  desc |= uint64_t{1024 >> 4} << 32;      // stride byte offset: one 8-row atom
  desc |= uint64_t{1} << 62;              // 128-byte swizzle
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

// D (64 x 256, fp32, 128 registers per thread) (+)= A (64 x 16, smem) B^T (256 x 16, smem)
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                                 int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n"
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
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
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
constexpr int kGroupM = 8;
__device__ __forceinline__ void tile_origin(int tile, int tiles_m, int tiles_n, int& m0, int& n0) {
  const int per_group = kGroupM * tiles_n;
  const int first_m = (tile / per_group) * kGroupM;
  const int rows = min(tiles_m - first_m, kGroupM);
  const int i = tile % per_group;
  m0 = (first_m + i % rows) * BM;
  n0 = (i / rows) * BN;
}

// One consumer warpgroup's share of a tile: its 64 rows of A times the stage's first `kWidth`
// rows of the B buffer, over all k-blocks, keeping one k-block of MMAs in flight and handing
// each stage back to the producer once the MMAs that read it are done.
template <int kWidth, int kRegs>
__device__ __forceinline__ void consume_tile(float (&d)[kRegs], Smem& s, int wg, int tid,
                                             int kblocks, int& stage, uint32_t& phase) {
  static_assert(kRegs == kWidth / 2, "m64nNk16: N / 2 fp32 registers per thread");
  int prev = -1;
  for (int kb = 0; kb < kblocks; ++kb) {
    mbar_wait(&s.full[stage], phase);
    wgmma_fence();
    const __nv_bfloat16* a = s.A[stage] + wg * 64 * BK;  // this warpgroup's 64 rows
    const __nv_bfloat16* b = s.B[stage];
#pragma unroll
    for (int k = 0; k < BK / 16; ++k) {  // 16 bf16 = 32 bytes along K inside the swizzle atom
      if constexpr (kWidth == 256)
        wgmma_m64n256k16(d, smem_desc(a + k * 16), smem_desc(b + k * 16), (kb > 0 || k > 0));
      else
        wgmma_m64n32k16(d, smem_desc(a + k * 16), smem_desc(b + k * 16), (kb > 0 || k > 0));
    }
    wgmma_commit();
    wgmma_wait<1>();  // the previous k-block's MMAs are done: its stage can be refilled
    if (prev >= 0 && tid == 0) mbar_arrive(&s.empty[prev]);
    prev = stage;
    if (++stage == STAGES) { stage = 0; phase ^= 1; }
  }
  wgmma_wait<0>();
  if (prev >= 0 && tid == 0) mbar_arrive(&s.empty[prev]);
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

// kR = 0: C = A B^T. kR = 32: also U = A Aadp^T (M, 32), computed by one extra column of tiles
// (n0 == N) that loads A's tiles again (from L2: the group's other tiles just read them) and
// Aadp's 32 rows, and runs wgmma n32: the adapter's down-projection fused into the base GEMM
// (plan item 1). NOT YET RUN ON A GPU in its kR = 32 form (written at the end of a session whose
// device time was spent). kR = 0 is the kernel measured in h100_wgmma_gemm.txt, whose consumer
// loop and epilogue were then moved into consume_tile / store_tile (same instructions, shared
// with the U tile; compiled here, not re-run).
template <int kR>
__global__ void __launch_bounds__(kThreads, 1)
gemm_nt_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
               const __grid_constant__ CUtensorMap map_u, __nv_bfloat16* __restrict__ C,
               __nv_bfloat16* __restrict__ U, int M, int N, int K) {
  static_assert(kR == 0 || kR == 32, "the U column is 32 wide");
  extern __shared__ uint8_t smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                     ~uintptr_t{1023});
  const int wg = threadIdx.x / 128;  // 0, 1: consumers; 2: producer
  const int tid = threadIdx.x % 128;
  const int tiles_m = M / BM, tiles_n = N / BN + (kR > 0 ? 1 : 0);
  const int num_tiles = tiles_m * tiles_n, kblocks = K / BK;
  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (wg == kConsumers) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        int m0, n0;
        tile_origin(tile, tiles_m, tiles_n, m0, n0);
        const bool u_tile = kR > 0 && n0 == N;
        for (int kb = 0; kb < kblocks; ++kb) {
          mbar_wait(&s.empty[stage], phase ^ 1);
          if (u_tile) {  // A's tile and Aadp's kR rows (into the first rows of the B buffer)
            mbar_expect_tx(&s.full[stage], kTileBytesA + kR * BK * 2);
            tma_load_2d(s.A[stage], &map_a, &s.full[stage], kb * BK, m0);
            tma_load_2d(s.B[stage], &map_u, &s.full[stage], kb * BK, 0);
          } else {
            mbar_expect_tx(&s.full[stage], kTileBytesA + kTileBytesB);
            tma_load_2d(s.A[stage], &map_a, &s.full[stage], kb * BK, m0);
            tma_load_2d(s.B[stage], &map_b, &s.full[stage], kb * BK, n0);
          }
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  float d[128];
  int stage = 0;
  uint32_t phase = 0;
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    int m0, n0;
    tile_origin(tile, tiles_m, tiles_n, m0, n0);
    if constexpr (kR > 0) {
      if (n0 == N) {  // the U tile: (128 x 32) = A's row block times Aadp^T
        float du[16];
        consume_tile<kR>(du, s, wg, tid, kblocks, stage, phase);
        store_tile<kR>(du, U, kR, m0 + wg * 64, 0, tid);
        continue;
      }
    }
    consume_tile<BN>(d, s, wg, tid, kblocks, stage, phase);
    store_tile<BN>(d, C, N, m0 + wg * 64, n0, tid);
  }
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                    cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                "wgmma_gemm: cuTensorMapEncodeTiled not found in the driver");
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
  TORCH_CHECK(r == CUDA_SUCCESS, "wgmma_gemm: cuTensorMapEncodeTiled failed with ", int(r));
  return map;
}

}  // namespace

namespace {
void check_operand(const at::Tensor& T, const at::Tensor& A, const char* name) {
  TORCH_CHECK(T.is_cuda() && T.device() == A.device(), "wgmma_gemm: ", name,
              " must be a CUDA tensor on A's device");
  TORCH_CHECK(T.scalar_type() == at::kBFloat16, "wgmma_gemm: ", name, " must be bf16, got ",
              T.scalar_type());
  TORCH_CHECK(T.dim() == 2 && T.size(1) == A.size(1), "wgmma_gemm: ", name,
              " must be 2-D with A's K = ", A.size(1), " columns");
  TORCH_CHECK(T.stride(1) == 1 && (T.stride(0) * 2) % 16 == 0, "wgmma_gemm: ", name,
              " needs unit stride along K and 16-byte aligned rows");
}
}  // namespace

// (C, U) = (A B^T, A Aadp^T) for A (M, K), B (N, K), Aadp (32, K) or undefined (then U is
// undefined), all bf16 CUDA with unit stride along K.
std::tuple<at::Tensor, at::Tensor> gemm_nt_impl(const at::Tensor& A, const at::Tensor& B,
                                                const at::Tensor& Aadp, int64_t grid_limit) {
  TORCH_CHECK(A.is_cuda() && A.scalar_type() == at::kBFloat16 && A.dim() == 2,
              "wgmma_gemm: A must be a 2-D bf16 CUDA tensor, got ", A.scalar_type(), " ",
              A.dim(), "-D on ", A.device());
  check_operand(A, A, "A");
  check_operand(B, A, "B");
  const int64_t M = A.size(0), N = B.size(0), K = A.size(1);
  TORCH_CHECK(M % BM == 0 && N % BN == 0 && K % BK == 0 && K > 0,
              "wgmma_gemm: M % 128, N % 256 and K % 64 must be 0, got ", M, " ", N, " ", K);
  const bool with_u = Aadp.defined();
  if (with_u) {
    check_operand(Aadp, A, "Aadp");
    TORCH_CHECK(Aadp.size(0) == 32, "wgmma_gemm: Aadp must have 32 rows, got ", Aadp.size(0));
  }
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor C = at::empty({M, N}, A.options());
  at::Tensor U = with_u ? at::empty({M, 32}, A.options()) : at::Tensor();
  if (M == 0 || (N == 0 && !with_u)) return {C, U};
  const CUtensorMap ma = make_map(A, BM), mb = make_map(B, BN);
  const CUtensorMap mu = with_u ? make_map(Aadp, 32) : ma;
  int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (grid_limit > 0 && grid_limit < sms) sms = static_cast<int>(grid_limit);
  const int tiles = static_cast<int>((M / BM) * (N / BN + (with_u ? 1 : 0)));
  const int grid = tiles < sms ? tiles : sms;
  const size_t smem = sizeof(Smem) + 1024;
  auto* c = reinterpret_cast<__nv_bfloat16*>(C.data_ptr());
  auto* u = with_u ? reinterpret_cast<__nv_bfloat16*>(U.data_ptr()) : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (with_u) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(gemm_nt_kernel<32>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    gemm_nt_kernel<32><<<grid, kThreads, smem, stream>>>(
        ma, mb, mu, c, u, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K));
  } else {
    C10_CUDA_CHECK(cudaFuncSetAttribute(gemm_nt_kernel<0>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    gemm_nt_kernel<0><<<grid, kThreads, smem, stream>>>(
        ma, mb, mu, c, u, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {C, U};
}

at::Tensor gemm_nt(const at::Tensor& A, const at::Tensor& B, int64_t grid_limit) {
  return std::get<0>(gemm_nt_impl(A, B, at::Tensor(), grid_limit));
}

std::tuple<at::Tensor, at::Tensor> gemm_nt_u(const at::Tensor& A, const at::Tensor& B,
                                             const at::Tensor& Aadp, int64_t grid_limit) {
  return gemm_nt_impl(A, B, Aadp, grid_limit);
}

// Registered through the dispatcher, as polykern's own ops are: torch.ops.polykern_exp.gemm_nt.
// (A pybind11 binding of the first version crashed the process on the device when a check failed
// instead of raising; the dispatcher's error path is the one polykern's tests exercise.)
TORCH_LIBRARY(polykern_exp, m) {
  m.def("gemm_nt(Tensor A, Tensor B, int grid_limit=0) -> Tensor", &gemm_nt);
  m.def("gemm_nt_u(Tensor A, Tensor B, Tensor Aadp, int grid_limit=0) -> (Tensor, Tensor)",
        &gemm_nt_u);
}
