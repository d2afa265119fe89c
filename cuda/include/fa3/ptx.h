// fa3/ptx.h — thin, documented wrappers around the Hopper PTX the steps use.
//
//   TMA       cp.async.bulk.tensor.4d  (global → shared, completes on an mbarrier)
//   mbarrier  init / arrive / arrive.expect_tx / try_wait.parity   (full/empty barriers of the ring)
//   WGMMA     wgmma.fence / commit_group / wait_group              (the MMA itself: wgmma_ops.h)
//   setmaxnreg, named barriers (bar.sync id, n), elect.sync, fence.proxy.async, %globaltimer
//
// Every function is a single PTX instruction (or a spin loop around one); see the PTX ISA 8.x
// sections named beside each.
#pragma once
#include <cstdint>
#include <cuda.h>  // CUtensorMap

namespace fa3 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------- mbarrier (PTX §9.7.13.15)
// A 64-bit barrier object in shared memory with a phase bit. A phase completes when the expected
// number of arrivals AND the expected transaction bytes (TMA) have both been counted; the phase bit
// then flips. Waiters name the parity of the phase they wait for.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(arrive_count));
}
// Make the inits visible to the async proxy (TMA) before any thread uses the barriers.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// One arrival that also tells the barrier to expect `bytes` more transaction bytes (the TMA loads).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Spin until the phase with the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// ---------------------------------------------------------------- clusters (PTX §9.7.12.3, §9.7.13.15)
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// This cluster's index in the grid and the number of clusters (x), read from special registers: cheap to
// re-read where needed, where a value derived from blockIdx would be held (or spilled) across the kernel.
__device__ __forceinline__ int cluster_id_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return static_cast<int>(r);
}
__device__ __forceinline__ int num_clusters_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return static_cast<int>(r);
}
// Arrive on the mbarrier at the same shared-memory offset in CTA `rank` of this cluster, with the default
// semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id). The slot's readers are
// WGMMAs retired by wgmma.wait_group before this. (`.release.cluster` compiled to MEMBAR.ALL.GPU before
// every arrival and made the kernel 1.7× slower.)
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_u32(bar)),
      "r"(rank)
      : "memory");
}
// Every thread of every CTA of the cluster: arrive, then wait for all (release/acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// One bounded look at a phase (the tracing observer must never hang the kernel): true if the phase
// with this parity completed within max_tries try_waits.
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity, int max_tries) {
  for (int i = 0; i < max_tries; ++i) {
    uint32_t ok;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    if (ok) return true;
  }
  return false;
}

// ---------------------------------------------------------------- TMA (PTX §9.7.9.25)
// Load one box of a 4-D tensor map (dims innermost first: headdim, seqlen, head, batch) into shared
// memory; the bytes are counted against `bar`. Coordinates past the tensor's end are zero-filled.
__device__ __forceinline__ void tma_load_4d(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(smem_u32(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// The same box, written to the same shared-memory offset in every CTA of the cluster named in `cta_mask`
// (bit i = cluster rank i); each destination CTA's `bar` (same offset) counts the bytes it received.
__device__ __forceinline__ void tma_load_4d_multicast(void* smem_dst, const CUtensorMap* tmap, uint64_t* bar,
                                                      uint16_t cta_mask, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%4, %5, %6, %7}], [%2], %3;" ::"r"(smem_u32(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(smem_u32(bar)), "h"(cta_mask), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Store one box from shared memory to a 4-D tensor (the reverse of tma_load_4d; rows past the tensor's end are
// not written). Completion is tracked per thread in bulk async-groups: commit with bulk_commit(), then
// bulk_wait_read<N>() (the smem may be reused) or bulk_wait<N>() (the writes are done). The smem writes
// it reads must be ordered before it by fence_proxy_async() (PTX §9.7.9.25.5.2, §9.7.9.25.6).
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* tmap, const void* smem_src, int c0, int c1, int c2,
                                             int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];"
               ::"l"(reinterpret_cast<uint64_t>(tmap)), "r"(smem_u32(smem_src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory"); }

// stmatrix (PTX §9.7.14.5.16): four 8×8 matrices of 16-bit elements from registers to shared memory. Register
// j of thread t holds row t/4, columns 2·(t%4) and +1 of matrix j (the mma accumulator layout); lane
// 8·j + r gives the address of row r of matrix j (16 contiguous bytes).
__device__ __forceinline__ void stmatrix_x4(uint32_t smem_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(smem_addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// One 16-byte global store (PTX st.global.v4.b32): `ptr` 16-byte aligned. (A uint4 store of packed 16-bit pairs
// can come out of nvcc as four 4-byte stores.)
__device__ __forceinline__ void st_global_16(void* ptr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// ldmatrix (PTX §9.7.14.5.15): the inverse of stmatrix_x4 — four 8×8 matrices of 16-bit elements from shared memory
// to registers, register j of thread t = row t/4, columns 2·(t%4) and +1 of matrix j; lane 8·j + r gives the address
// of row r of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t smem_addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

// The same with .trans: matrix j is stored transposed — lane 8·j + r gives the address of row r of matrix jᵀ
// (column r of the fragment's matrix j: its 8 elements of rows t/4 become 16 contiguous bytes).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t smem_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(smem_addr), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* tmap) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

// ---------------------------------------------------------------- WGMMA sync (PTX §9.7.15.6–8)
// fence: registers used as accumulators/A operands were last written by ordinary instructions.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
// Close the group of wgmma.mma_async issued so far by this warpgroup.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keep the compiler from moving accumulator reads/writes across an async MMA boundary.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The 16-bit A operand of an RS WGMMA is read from registers until wgmma.wait_group: keep it live.
template <int M, int N>
__device__ __forceinline__ void fence_regs_u32(uint32_t (&r)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// ---------------------------------------------------------------- registers & barriers
// setmaxnreg (PTX §9.7.17.1): producer gives registers back, consumers take them.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs)); }
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs)); }

// Named barriers (bar.sync id, n): `n` threads (a multiple of 32) rendezvous on barrier `id`.
// bar.arrive signals without waiting — the pingpong hand-off between consumer warpgroups.
__device__ __forceinline__ void named_barrier_sync(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int num_threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// Order this thread's generic-proxy smem writes before later async-proxy (TMA/WGMMA) accesses.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// One lane of the warp returns true (elect.sync): the TMA issuer.
__device__ __forceinline__ bool elect_one() {
  uint32_t pred = 0;
  asm volatile(
      "{\n.reg .pred p;\nelect.sync _|p, 0xffffffff;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(pred));
  return pred != 0;
}

__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Warpgroup geometry: four consecutive warps issue one wgmma together, on a 64-row (M = 64) tile.
constexpr int kWarpsPerWarpgroup = 4;
constexpr int kThreadsPerWarpgroup = 32 * kWarpsPerWarpgroup;
constexpr int kRowsPerWarpgroup = 64;

__device__ __forceinline__ int warpgroup_id() {
  // Uniform across the warpgroup; __shfl_sync makes the compiler treat it as warp-uniform.
  return __shfl_sync(0xffffffff, threadIdx.x / kThreadsPerWarpgroup, 0);
}

}  // namespace fa3
