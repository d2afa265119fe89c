// ============================================================================================
// fa3-lab — FlashAttention-3 forward, built up in steps (cuda/steps/; the table: fa3_lab/registry.py):
//   01_tma_wgmma               TMA loads + WGMMA GEMMs, two consumer warpgroups, no specialization
//   02_warp_specialized        + producer warpgroup, s-stage K/V ring (full/empty mbarriers), setmaxnreg
//   03_pingpong                + named-barrier pingpong of the two consumer warpgroups
//   04_intra_warpgroup_overlap + softmax of tile j under the P·V GEMM of tile j−1 (paper Alg. 2)
//   05_fp8                     + (on 04) e4m3 operands, per-block descales, V k-major (paper §3.3)
//   06_persistent              + (on 04) persistent grid: CTAs stride over the work tiles
//   07_causal_scheduler        + causal: dynamic tile scheduler, longest tiles first
//   08_tma_store_epilogue      + O through shared memory: stmatrix, then one TMA store
//   09_three_warpgroups        + headdim 64: three consumer warpgroups on 192-row tiles
//   10_kv_multicast            + clusters of two CTAs share each K/V tile by TMA multicast   <- this file
//   bwd/11_…                   the backward (paper App. B.1), a series of its own
// ============================================================================================
//
// Step 10 extends 09 by:
//   1. clusters of two CTAs (non-causal headdim 128, persistent): a work tile is a pair of adjacent row
//      blocks of one (batch, head), CTA rank r of the cluster takes row block 2·pair + r;
//   2. K/V multicast: each CTA loads half of every K/V tile's rows and multicasts them into the same ring
//      slot of both CTAs (producer.h, produce_kv), so the pair reads each K/V tile from L2 once;
//   3. a slot is released in both CTAs (release_slot arrives on the peer's empty barrier too), and no CTA
//      leaves while its peer may still write into its shared memory (cluster_sync).
// Main loop (step 04's), per K/V tile j, last to first, in a turn of the pingpong:
//   1. wait full_k[s_j]; wait for the turn
//   2. S_next = Q·K_jᵀ (group 1); wait full_v[s_{j−1}]; O += P_{j−1}·V_{j−1} (group 2); hand the turn over
//   3. wgmma.wait_group 1: S_next ready, P·V still running; release K_j               (Alg. 2 line 9)
//   4. mask; online softmax of S_next → P_j, corr_j, under the P·V GEMM              (Alg. 2 lines 10–11)
//   5. wgmma.wait_group 0: P·V done; release V_{j−1}                                 (Alg. 2 line 12)
//   6. P_j → 16-bit A fragments; O *= corr_j if some row's max moved (lazy rescale)
// then a last turn O += P_last·V_last and 7. the epilogue: O / ℓ and lse.
// Twin: none — the multicast changes where K/V bytes come from, not what any warpgroup computes; the
// schedule is reference/fa3_pipeline.py::pipelined_forward's.
// Measured (NVIDIA H200, commit fc86c39, 2026-12-04; fa3_lab/results/nvidia-h200/ablation.json): Table 2
//   shape (4, 8448, 16, 128): bf16 676, fp16 653 TFLOPs/s (1.04× step 09).
// Known limits: the launcher takes min(work, SMs / 2) clusters and assumes all are co-resident; the
// cluster runs only at non-causal headdim 128 (elsewhere it measured neutral or lost, docs/performance.md).
// Tried (docs/performance.md has the numbers):
//   - cluster / no cluster, headdim 128 non-causal 1k–16k: 1.01 / 1.01 / 1.00 / 1.00 / 1.03 (36c819a) — kept;
//     with the TMA-store epilogue 1.00 / 1.00 / 0.99 / 1.02 / 1.04 (ab_cluster_tma) — kept.
//   - peer release with mbarrier.arrive.release.cluster: 0.58× (ab_cluster_membar) — plain arrive on the
//     peer's barrier (mapa) instead.
//   - Bc = 176 with O in the V ring and no cluster: 0.95–1.00× this (ab_oinv128, 6866ce8) — not adopted.
//   - L2 prefetch of the next work tile's loads: 0.95–1.02× (722fc88, reverted a805d2d); the last turn
//     merged with the next tile's first Q·Kᵀ: 0.95–1.03× (3e7dfec, reverted a805d2d).
// This is flash_attn_func's default step (fa3_lab/registry.py, DEFAULT_STEP).
// ============================================================================================
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "fa3/block_info.h"
#include "fa3/epilogue.h"
#include "fa3/host.h"
#include "fa3/launch.h"
#include "fa3/params.h"
#include "fa3/producer.h"
#include "fa3/ptx.h"
#include "fa3/softmax.h"
#include "fa3/trace.h"
#include "fa3/wgmma.h"

namespace fa3 {
namespace step10 {

// kDyn: the dynamic-scheduler instantiation of a causal config (Launch picks it by seqlen_k against
// kDynamicMaxSeqlen, params.h).
template <typename T, int kHeadDim, bool kCausal, bool kDyn = false>
struct Config {
  // Headdim 64: three consumer warpgroups (step 09); traced builds keep two (the trace has two consumer rows).
  static constexpr int kNumConsumers = (kHeadDim == 64 && !kTraceBuild) ? 3 : 2;
  static constexpr int kBlockM = kRowsPerWarpgroup * kNumConsumers;       // Br = consumers × 64 rows
  // Bc. Three consumers at headdim 64 keep 128: S 64 + P 32 + O 32 registers fit their 160. Non-causal
  // headdim 128: 160, so that the O tile of the TMA-store epilogue fits beside Q and two K/V stages (step 08).
  static constexpr int kBlockN = kHeadDim == 64 ? 128 : kHeadDim == 128 ? (kCausal ? 128 : 160) : 80;
  static constexpr int kThreads = kThreadsPerWarpgroup * (1 + kNumConsumers);
  static constexpr int kStages = kHeadDim == 64 ? 4 : 2;
  static constexpr bool kKFirst = true;      // producer order K_{j+1} before V_j (producer.h, for_each_kv)
  static constexpr int kTurnBarrier = 1;     // named barriers 1 .. kNumConsumers (0 is __syncthreads)
  static constexpr int kAtoms = kHeadDim / kAtomCols16;        // 64-column swizzle atoms per row
  static constexpr int kQBytes = kBlockM * kHeadDim * sizeof(T);
  static constexpr int kKVBytes = kBlockN * kHeadDim * sizeof(T);
  // Persistent (step 06): min(tiles, SMs) CTAs striding over the tiles, non-causal at headdim 64/128.
  // Causal (step 07): persistent CTAs take their tiles from the dynamic scheduler (kDyn). Traced builds
  // run one tile per CTA (their timelines record one).
  static constexpr bool kDynamic = !kTraceBuild && kCausal && kDyn;
  static constexpr bool kPersistent = !kTraceBuild && ((kHeadDim <= 128 && !kCausal) || kDynamic);
  // Clusters of two CTAs sharing each K/V tile (this step): persistent non-causal headdim 128.
  static constexpr int kClusterM = (kPersistent && kHeadDim == 128 && !kCausal) ? 2 : 1;
  // 24·128 + 240·256 = 64512 ≤ 65536 registers per SM; three consumers: 24·128 + 160·384 = 64512. The
  // multicast producer spilled at 24 and 32 (its cluster rank and mask): 40·128 + 232·256 = 64512, and the
  // consumers' main loop is the same length at 232.
  static constexpr int kProducerRegs = kClusterM > 1 ? 40 : 24;
  static constexpr int kConsumerRegs = kClusterM > 1 ? 232 : kNumConsumers == 3 ? 160 : 240;
  static constexpr int kBarrierBytes = 8 * (2 + 4 * kStages + 5);  // + sched_full[2], sched_empty[2], o_free
  static constexpr int kOBytes = kBlockM * kHeadDim * sizeof(T);  // (kBlockM, kHeadDim) O tile
  static constexpr int kSmemNoO = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes + 2 * sizeof(int);
  // O's smem tile for the TMA-store epilogue: its own region where it fits; else, in a CTA that runs one tile
  // (headdim 256 non-causal), the K ring, which is free once every consumer warp has released its last K.
  static constexpr bool kOwnO = kSmemNoO + kOBytes <= 227 * 1024;
  static constexpr bool kOInK = !kOwnO && !kPersistent && kStages * kKVBytes >= kOBytes;
  // Persistent with two consumers and no room (headdim 256, causal): in the V ring, as FA3 — warpgroup c
  // in the stage of V tile n − 2 + c (every consumer warp released it), and the producer holds the next
  // tile's first V until both stores have read their tiles (o_free, producer.h produce_tile).
  static constexpr bool kOInV = !kOwnO && !kOInK && kPersistent && kNumConsumers == 2 &&
                                kClusterM == 1 && kKVBytes >= kRowsPerWarpgroup * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr bool kTmaStoreO = kOwnO || kOInK || kOInV;
  static constexpr int kSmemBytes = kSmemNoO + (kOwnO ? kOBytes : 0);
  static constexpr int kEpiBarrier = kTurnBarrier + kNumConsumers;  // + c: warpgroup c's epilogue barrier
};

template <typename T, int kHeadDim, bool kCausal, bool kDyn>
__global__ void __launch_bounds__(Config<T, kHeadDim, kCausal, kDyn>::kThreads, 1)
    fwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
               const __grid_constant__ CUtensorMap tmap_v, const __grid_constant__ CUtensorMap tmap_o,
               const FwdParams p) {
  using Cfg = Config<T, kHeadDim, kCausal, kDyn>;
  using Traits = ElemTraits<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kTileElems = Cfg::kKVBytes / sizeof(T);
  constexpr int kTurnBarrier = Cfg::kTurnBarrier;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sQ = reinterpret_cast<T*>(smem);                              // (kBlockM, kHeadDim) smem, 128B swizzle, kAtoms atoms
  T* sK = reinterpret_cast<T*>(smem + Cfg::kQBytes);               // (kStages, kBlockN, kHeadDim) ring
  T* sV = sK + kStages * kTileElems;                               // (kStages, kBlockN, kHeadDim) ring
  T* sO = Cfg::kOInK ? sK : sV + kStages * kTileElems;  // O tiles: own (kOwnO) or K ring (kOInK); V ring: per tile
  uint64_t* full_q = reinterpret_cast<uint64_t*>(smem + Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes +
                                                 (Cfg::kOwnO ? Cfg::kOBytes : 0));
  uint64_t* empty_q = full_q + 1;        // consumers done with Q (persistent: the next tile's Q may land)
  uint64_t* full_k = empty_q + 1;       // (kStages)
  uint64_t* full_v = full_k + kStages;  // (kStages)
  uint64_t* empty_k = full_v + kStages;  // (kStages)
  uint64_t* empty_v = empty_k + kStages;  // (kStages)
  uint64_t* sched_full = empty_v + kStages;  // (2) dynamic scheduler: the producer wrote tile_slot[n % 2]
  uint64_t* sched_empty = sched_full + 2;    // (2) the consumers read it
  // (2) the next work tile; written and read with shared-memory atomics (ordered by the mbarriers above:
  // the atomics only tell compute-sanitizer's racecheck, which does not model mbarrier ordering of
  // ordinary accesses, that these are not plain loads and stores)
  uint64_t* o_free = sched_empty + 2;  // Cfg::kOInV: both warpgroups' O stores have read the V ring
  int* tile_slot = reinterpret_cast<int*>(o_free + 1);

  // Work tiles t = (b, h, m_block), m_block fastest and walked from the last (the longest, causal) down,
  // so CTAs running at once share a head's K/V in L2. Persistent: CTA i takes t = i, i + gridDim.x, …
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
  // With a cluster (Cfg::kClusterM = 2) a work tile t is a pair of adjacent row blocks of one (batch, head);
  // the cluster's CTA of rank r takes row block 2·pair + r (past the last row block: zero rows, no stores).
  constexpr int kCluster = Cfg::kClusterM;
  const int num_pairs = (num_m + kCluster - 1) / kCluster;
  const int num_tiles = num_pairs * p.nheads * p.batch;
  auto decode = [&](int t, int& m_block, int& h, int& b) {
    if constexpr (!Cfg::kPersistent) {  // straight from blockIdx (cheap to re-read: fewer live registers)
      m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    } else if constexpr (Cfg::kDynamic) {
      // Sections of p.sched_heads (batch, head) pairs; within one, row blocks from the last (longest) down,
      // the section's heads fastest: the tiles in flight share a few heads' K/V in L2, and the short tiles
      // come last, where they fill the tail.
      const int total_bh = p.nheads * p.batch;
      const int sec = t / (num_m * p.sched_heads);
      const int w = t - sec * num_m * p.sched_heads;
      const int heads_here = min(p.sched_heads, total_bh - sec * p.sched_heads);
      const int m_rev = w / heads_here;
      const int bh = sec * p.sched_heads + (w - m_rev * heads_here);
      m_block = num_m - 1 - m_rev;
      h = bh % p.nheads;
      b = bh / p.nheads;
    } else {
      // (the rank is re-read where used: a special register, cheaper than a register held across the loop)
      m_block = kCluster * (num_pairs - 1 - t % num_pairs) + (kCluster > 1 ? static_cast<int>(cluster_ctarank()) : 0);
      h = (t / num_pairs) % p.nheads;
      b = t / (num_pairs * p.nheads);
    }
  };
  // First tile and stride (persistent). Read where used: held from here across setmaxnreg, a value derived
  // from the cluster index was spilled.
  auto t_first = [&]() -> int {
    return kCluster > 1 ? cluster_id_x()
           : Cfg::kPersistent ? blockIdx.x : blockIdx.x + num_m * (blockIdx.y + p.nheads * blockIdx.z);
  };
  auto t_stride = [&]() -> int { return kCluster > 1 ? num_clusters_x() : gridDim.x; };
  const int wg = warpgroup_id();

  if (threadIdx.x == 0) {
    init_ring_barriers<kStages>(full_q, full_k, full_v, empty_k, empty_v, kWarpsPerWarpgroup * Cfg::kNumConsumers * kCluster);
    mbarrier_init(empty_q, kWarpsPerWarpgroup * Cfg::kNumConsumers);
    mbarrier_init(&sched_full[0], 1);
    mbarrier_init(&sched_full[1], 1);
    mbarrier_init(&sched_empty[0], kWarpsPerWarpgroup * Cfg::kNumConsumers);
    mbarrier_init(&sched_empty[1], kWarpsPerWarpgroup * Cfg::kNumConsumers);
    mbarrier_init(o_free, Cfg::kNumConsumers);
    fence_barrier_init();
  }
  if constexpr (kCluster > 1) cluster_sync();  // the peer's barriers are initialized before any multicast
  else __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if constexpr (!Cfg::kPersistent) {  // one tile: step 02's producer (and its trace observer)
      int m_block, h, b;
      decode(t_first(), m_block, h, b);
      const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);
      if (blocks.n_block_max > 0)
        produce_q_kv<T, Cfg>(&tmap_q, &tmap_k, &tmap_v, sQ, sK, sV, full_q, full_k, full_v, empty_k, empty_v,
                             m_block, h, h / (p.nheads / p.nheads_kv), b, blocks.n_block_max, p);
    } else if (threadIdx.x / 32 == 0 && elect_one()) {
      tma_prefetch_descriptor(&tmap_k);
      tma_prefetch_descriptor(&tmap_v);
      int kv = 0, q_iter = 0;
      for (int t = t_first(), n = 0; t < num_tiles; ++n) {
        int m_block, h, b;
        decode(t, m_block, h, b);
        const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);
        if (blocks.n_block_max > 0) {
          produce_tile<T, Cfg>(&tmap_q, &tmap_k, &tmap_v, sQ, sK, sV, full_q, empty_q, full_k, full_v, empty_k,
                               empty_v, m_block, h, h / (p.nheads / p.nheads_kv), b, blocks.n_block_max, kv, q_iter,
                               Cfg::kOInV ? o_free : nullptr);
          kv += blocks.n_block_max;
          ++q_iter;
        }
        if constexpr (Cfg::kDynamic) {
          // The next tile, claimed once this one's loads are all issued (so a CTA that finishes early
          // claims early), and handed to the consumers through tile_slot[n % 2].
          const int t_next = atomicAdd(p.tile_counter, 1) + static_cast<int>(gridDim.x);
          mbarrier_wait(&sched_empty[n & 1], ((n >> 1) & 1) ^ 1);  // a fresh barrier reads as released
          atomicExch(&tile_slot[n & 1], t_next);
          mbarrier_arrive(&sched_full[n & 1]);  // release: the slot's write is seen by the waiters
          t = t_next;
        } else {
          t += t_stride();
        }
      }
    }
  } else {
    // ------------------------------------------------------------------ consumer warpgroups
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    FA3_TRACE_DECL(tr);
    FA3_TRACE_INIT(tr, p, 1 + wg, threadIdx.x % kThreadsPerWarpgroup == 0);
    const int c = wg - 1;
    // Pingpong turn keeping (round robin over kNumConsumers): warpgroup c waits on turn[c] and hands over
    // to turn[(c + 1) % kNumConsumers]. Consumer 0 goes first. Every turn of warpgroup 0 is preceded by a
    // hand-over from the last warpgroup (the first by the arrival here, the next tile's first by the last
    // warpgroup's epilogue turn) and consumer 0 takes one last turn at the end, so every arrival is
    // matched by a wait.
    constexpr int kNumConsumers = Cfg::kNumConsumers;
    auto wait_turn = [&]() { named_barrier_sync(kTurnBarrier + c, 2 * kThreadsPerWarpgroup); };
    auto pass_turn = [&]() { named_barrier_arrive(kTurnBarrier + (c + 1 == kNumConsumers ? 0 : c + 1), 2 * kThreadsPerWarpgroup); };
    if (c == kNumConsumers - 1) named_barrier_arrive(kTurnBarrier + 0, 2 * kThreadsPerWarpgroup);
    const uint32_t sQ_addr = smem_u32(sQ);
    int kv = 0, q_iter = 0;  // as the producer's

    auto consume_tile = [&](int t) {
      int m_block, h, b;
      decode(t, m_block, h, b);
      const BlockInfo<kBlockM, kBlockN, kCausal> blocks(m_block, p.seqlen_q, p.seqlen_k);
      const int n_block_max = blocks.n_block_max;
      const int row0 = m_block * kBlockM + c * kRowsPerWarpgroup;  // this warpgroup's first query row
      // Output pointers, computed where they are used (re-deriving h, b from t there keeps 4 registers
      // free during the main loop: at headdim 256 they are the difference between 0 and 16 bytes of spill).
      auto out_ptrs = [&](T*& o_base, float*& lse_base) {
        int m_, h_, b_;
        decode(t, m_, h_, b_);
        o_base = reinterpret_cast<T*>(p.o) + b_ * p.o_batch_stride + h_ * p.o_head_stride;
        lse_base = p.lse + (static_cast<int64_t>(b_) * p.nheads + h_) * p.seqlen_q;
      };
      if (n_block_max <= 0) {  // causal, seqlen_q > seqlen_k: these rows see no key
        T* o_base;
        float* lse_base;
        out_ptrs(o_base, lse_base);
        store_empty_rows<T, kHeadDim>(o_base, p.o_row_stride, lse_base, row0, row0 + kRowsPerWarpgroup, p.seqlen_q,
                                      threadIdx.x % kThreadsPerWarpgroup, kThreadsPerWarpgroup);
        return;
      }
      OnlineSoftmax softmax;
      softmax.init();
      float o[kHeadDim / 2];  // (kRowsPerWarpgroup, kHeadDim) fp32 accumulator fragment, registers
#pragma unroll
      for (int e = 0; e < kHeadDim / 2; ++e) o[e] = 0.f;
      mbarrier_wait(full_q, q_iter & 1);
      const int kv0 = kv;
      auto stage_of = [&](int i) { return (kv0 + i) % kStages; };
      auto phase_of = [&](int i) { return static_cast<uint32_t>(((kv0 + i) / kStages) & 1); };
      auto release_q_after = [&](int i) {  // the tile's last Q·Kᵀ is done: Q's slot may be refilled
        if constexpr (Cfg::kPersistent)  // one tile per CTA: nobody refills Q
          if (threadIdx.x % 32 == 0 && i == n_block_max - 1) mbarrier_arrive(empty_q);
      };

      float s[kBlockN / 2];           // (kRowsPerWarpgroup, kBlockN) fp32 fragment: S, then P, registers
      uint32_t pa[kBlockN / 16][4];   // P_{j−1} as 16-bit A fragments, registers
      float corr[2];                  // corr_{j−1}: O's rescale, applied just before O += P_{j−1}·V_{j−1}
      // prologue, tile 0: S = Q·K_0ᵀ
      mbarrier_wait(&full_k[stage_of(0)], phase_of(0));
      wait_turn();
      FA3_TRACE_STAMP(tr, kGemm0Issue, 0);
      wgmma_fence();
      gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, c * kRowsPerWarpgroup, smem_u32(sK + stage_of(0) * kTileElems), false);
      wgmma_commit();
      pass_turn();
      wgmma_wait<0>();
      fence_regs(s);
      FA3_TRACE_STAMP(tr, kGemm0Done, 0);
      FA3_TRACE_STAMP(tr, kSoftmaxBegin, 0);
      if (threadIdx.x % 32 == 0) release_slot<Cfg>(&empty_k[stage_of(0)]);  // K_0 read: release its slot
      release_q_after(0);
      {
        const int n_block = n_block_max - 1;
        if (blocks.needs_mask(n_block))
          apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        softmax.update<kBlockN>(s, p.scale_log2, corr);  // corr = 0 and O = 0: the rescale is harmless
        pack_p<Traits, kBlockN>(s, pa);
      }
      FA3_TRACE_STAMP(tr, kSoftmaxEnd, 0);
      // One tile of the main loop. kMask is a compile-time flag: the tiles that cross seqlen_k or the
      // diagonal come first (we walk the tiles backwards) and get their own loop, so the overlapped region
      // of the unmasked loop has no branch — ptxas otherwise places wgmma.wait_group 0 at the branch's
      // join point, ahead of the exponentials, and the overlap is lost (SASS, docs/performance.md).
      auto tile = [&](int i, auto mask_tag) {
        constexpr bool kMask = decltype(mask_tag)::value;
        const int n_block = n_block_max - 1 - i;
        const int stage = stage_of(i), prev = stage_of(i - 1);
        // 1. operands ready; my turn
        mbarrier_wait(&full_k[stage], phase_of(i));
        wait_turn();
        // 2. S_next = Q·K_jᵀ (group 1);  O += P_{j−1}·V_{j−1} (group 2);  hand over
        FA3_TRACE_STAMP(tr, kGemm0Issue, i);
        wgmma_fence();
        gemm_ss<T, kBlockN, kHeadDim, kBlockM, kBlockN>(s, sQ_addr, c * kRowsPerWarpgroup, smem_u32(sK + stage * kTileElems), false);
        wgmma_commit();
        mbarrier_wait(&full_v[prev], phase_of(i - 1));  // V_{j−1}: waited for after Q·K_jᵀ is issued
        FA3_TRACE_STAMP(tr, kGemm1Issue, i - 1);
        wgmma_fence();  // each GEMM its own fence: ptxas then tracks the two groups separately
        gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + prev * kTileElems));
        wgmma_commit();
        pass_turn();
        // 3. S_next ready; P·V still in flight
        wgmma_wait<1>();
        fence_regs(s);
        FA3_TRACE_STAMP(tr, kGemm0Done, i);
        FA3_TRACE_STAMP(tr, kSoftmaxBegin, i);
        if (threadIdx.x % 32 == 0) release_slot<Cfg>(&empty_k[stage]);  // K_j read: release its slot
        release_q_after(i);
        // 4. mask, softmax of S_next (under the P·V GEMM)
        if constexpr (kMask) apply_mask<kBlockN, kCausal>(s, row0, n_block * kBlockN, p.seqlen_k, blocks.causal_offset);
        const bool rescale = softmax.update_lazy<kBlockN>(s, p.scale_log2, corr);  // O *= corr only if a max moved
        // Pin P and corr before the wait, so the exponentials cannot sink below it.
        fence_regs(s);
        fence_regs(corr);
        FA3_TRACE_STAMP(tr, kSoftmaxEnd, i);
        // 5. P·V done; release V_{j−1}'s slot
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs_u32(pa);
        FA3_TRACE_STAMP(tr, kGemm1Done, i - 1);
        if (threadIdx.x % 32 == 0) release_slot<Cfg>(&empty_v[prev]);  // V_{j−1} read
        // 6. P_j → 16-bit, then O *= corr_j (lazy: only if a max moved). In this order the packing stays in
        // the basic block of the exponentials, so ptxas interleaves its F2FPs with the MUFU.EX2s; after the
        // rescale's branch it ran as a serial tail (ncu source view, docs/performance.md, session 5).
        pack_p<Traits, kBlockN>(s, pa);
        if (rescale) rescale_rows<kHeadDim>(o, corr);
        corr[0] = corr[1] = 1.f;
      };
      int i = 1;
      for (; i < n_block_max && blocks.needs_mask(n_block_max - 1 - i); ++i) tile(i, std::true_type{});
      for (; i < n_block_max; ++i) tile(i, std::false_type{});
      // epilogue turn: O += P_last·V_last
      {
        const int last = stage_of(n_block_max - 1);
        mbarrier_wait(&full_v[last], phase_of(n_block_max - 1));
        wait_turn();
        rescale_rows<kHeadDim>(o, corr);
        FA3_TRACE_STAMP(tr, kGemm1Issue, n_block_max - 1);
        wgmma_fence();
        gemm_rs<T, kHeadDim, kBlockN, kBlockN>(o, pa, smem_u32(sV + last * kTileElems));
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        fence_regs(o);
        FA3_TRACE_STAMP(tr, kGemm1Done, n_block_max - 1);
        if (threadIdx.x % 32 == 0) release_slot<Cfg>(&empty_v[last]);
      }
      kv += n_block_max;
      ++q_iter;
      // 7. epilogue
      float inv_sum[2], lse[2];
      softmax.finalize(p.scale_log2, inv_sum, lse);
      T* o_base;
      float* lse_base;
      out_ptrs(o_base, lse_base);
      if constexpr (Cfg::kTmaStoreO) {
        // This warpgroup's O tile in smem is free: its own tile once its previous TMA store has read it
        // (bulk_wait_read by the thread that issued it, then the warpgroup's barrier); in the K ring once every
        // consumer warp of the CTA has released the last K tile of each stage, in the V ring once every one has
        // released the V tile of that stage (the empty barriers' last phases). Then stmatrix; fence for the
        // async proxy; barrier; one thread stores the kHeadDim/64 atoms and (V ring: after their reads, which
        // it signals on o_free) moves on.
        T* s_o = sO + c * kRowsPerWarpgroup * kHeadDim;
        const bool issuer = threadIdx.x % kThreadsPerWarpgroup == 0;
        if constexpr (Cfg::kOInV) {
          const int i = n_block_max - 2 + c;  // V tile whose stage takes this warpgroup's O
          const int st = ((kv0 + i) % kStages + kStages) % kStages;
          s_o = sV + st * kTileElems;
          if (i >= 0) mbarrier_wait(&empty_v[st], phase_of(i));  // (i < 0: last used by the previous tile)
        } else if constexpr (Cfg::kOInK) {
#pragma unroll
          for (int st = 0; st < kStages; ++st) {  // the last K tile i that went through stage st
            const int i = n_block_max - 1 - (((kv0 + n_block_max - 1 - st) % kStages) + kStages) % kStages;
            if (i >= 0) mbarrier_wait(&empty_k[st], phase_of(i));
          }
        } else {
          if (issuer) bulk_wait_read<0>();
          named_barrier_sync(Cfg::kEpiBarrier + c, kThreadsPerWarpgroup);
        }
        write_o_smem<Traits, kHeadDim>(o, inv_sum, smem_u32(s_o));
        fence_proxy_async();
        named_barrier_sync(Cfg::kEpiBarrier + c, kThreadsPerWarpgroup);
        if (issuer) {
          int m_, h_, b_;
          decode(t, m_, h_, b_);
#pragma unroll
          for (int a = 0; a < kHeadDim / kAtomCols16; ++a) tma_store_4d(&tmap_o, s_o + a * kRowsPerWarpgroup * kAtomCols16, kAtomCols16 * a, row0, h_, b_);
          bulk_commit();
          if constexpr (Cfg::kOInV) {  // the V ring may be refilled once the store has read it
            bulk_wait_read<0>();
            mbarrier_arrive(o_free);
          }
        }
        store_lse(lse, lse_base, row0, p.seqlen_q);
      } else {
        store_o_lse<Traits, T, kHeadDim>(o, inv_sum, lse, o_base, p.o_row_stride, lse_base, row0, p.seqlen_q);
      }
    };
    if constexpr (Cfg::kDynamic) {
      for (int t = t_first(), n = 0; t < num_tiles; ++n) {
        consume_tile(t);
        mbarrier_wait(&sched_full[n & 1], (n >> 1) & 1);
        // Broadcast from lane 0: the tile index is the same in every lane, and a value the compiler knows
        // to be warp-uniform keeps the whole tile's index math (K/V stage, WGMMA descriptors) in uniform
        // registers — read straight from the atomic, every descriptor took per-thread adds and R2UR
        // moves (SASS: ~40 more instructions per K/V tile, docs/performance.md).
        t = __shfl_sync(0xffffffffu, atomicAdd(&tile_slot[n & 1], 0), 0);
        __syncwarp();
        if (threadIdx.x % 32 == 0) mbarrier_arrive(&sched_empty[n & 1]);  // slot read by this warp
      }
    } else if constexpr (Cfg::kPersistent) {
      for (int t = t_first(); t < num_tiles; t += t_stride()) consume_tile(t);
    } else {
      consume_tile(t_first());
    }
    if constexpr (Cfg::kTmaStoreO)  // the last O stores have written before the CTA (and its smem) goes
      if (threadIdx.x % kThreadsPerWarpgroup == 0) bulk_wait<0>();
    if (c == 0) wait_turn();  // matches the last consumer's last hand-over
    FA3_TRACE_FINISH(tr);
  }
  // Cluster: no CTA leaves while the other may still multicast into its smem or arrive on its barriers.
  if constexpr (kCluster > 1) cluster_sync();
}

// Causal sections of the dynamic tile order: the K and V of one section's heads take at most this much L2.
constexpr long long kSchedL2Bytes = 32LL << 20;

template <typename T, int kHeadDim, bool kCausal>
struct Launch {
  static void run(const FwdParams& p, cudaStream_t stream) {
    using Dyn = Config<T, kHeadDim, kCausal, true>;
    if constexpr (Dyn::kDynamic) {
      if (p.seqlen_k > kDynamicMaxSeqlen) {
        launch_fwd<Config<T, kHeadDim, kCausal>>(fwd_kernel<T, kHeadDim, kCausal, false>, p, stream, "step10");
        return;
      }
      if (p.tile_counter == nullptr) throw std::runtime_error("step10: causal needs p.tile_counter (a zeroed int32)");
      // (batch, head) pairs per section: their K and V together take at most kSchedL2Bytes of the 50 MB L2.
      FwdParams q = p;
      const long long kv_bytes = 2LL * p.seqlen_k * kHeadDim * static_cast<long long>(sizeof(T));
      const long long heads = kSchedL2Bytes / (kv_bytes > 0 ? kv_bytes : 1);
      q.sched_heads = static_cast<int>(heads < 1 ? 1 : heads > p.nheads * p.batch ? p.nheads * p.batch : heads);
      launch_fwd<Dyn>(fwd_kernel<T, kHeadDim, kCausal, true>, q, stream, "step10");
    } else {
      launch_fwd<Config<T, kHeadDim, kCausal>>(fwd_kernel<T, kHeadDim, kCausal, false>, p, stream, "step10");
    }
  }
};

}  // namespace step10

// Entry point used by binding.cpp: dispatch on dtype × headdim × causal.
void run_fwd_step10(const FwdParams& p, cudaStream_t stream) { dispatch_fwd<step10::Launch>(p, stream, "step10"); }

}  // namespace fa3
