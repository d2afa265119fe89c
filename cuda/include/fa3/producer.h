// fa3/producer.h — the producer warpgroup of the warp-specialized steps (02 onwards) and the
// barriers of its K/V ring (paper §3.1, Algorithm 1 lines 3–8).
//
// Ring: kStages slots of K and V in shared memory. full_k[s]/full_v[s] complete when the TMA bytes of
// slot s have landed (the producer's arrive.expect_tx is the one arrival); empty_k[s]/empty_v[s]
// complete when every consumer warp has released that slot (one arrival per warp). K and V are
// released separately because they are consumed at different times: K_j by Q·K_jᵀ, V_j by P_j·V_j,
// which steps 03/04 issue a whole tile later — with one barrier for both, a K slot would sit idle
// until P·V finished and a 2-stage ring would behave like 1 stage (seen in the traces, docs/performance.md).
// The producer waits on empty with the flipped parity — a fresh barrier counts as "the previous
// phase completed", so the ring starts empty — and consumers wait on full with the parity of the
// pass: (tile / kStages) & 1.
// Clusters (step 10, non-causal headdim 128; ClusterM<Cfg> = 2): the CTAs of a cluster walk the same
// K/V tiles, each loads 1/kCluster of every tile's rows and multicasts it into the same slot of every
// CTA (paper §2.2's TMA; FA3's cluster shape there), so a slot's empty barrier counts the consumer warps
// of all CTAs of the cluster (release_slot).
#pragma once
#include <cstdint>
#include <type_traits>

#include "params.h"
#include "ptx.h"
#include "trace.h"
#include "wgmma.h"

namespace fa3 {

// Load order of the ring. By default K_j then V_j. A config with `kKFirst = true` (steps 04+) issues
// K_{j+1} before V_j — the order its consumers use them in: turn j+1 needs K_{j+1} and V_j, and K_{j+1}'s
// slot frees half a turn before V_j's (K is released after Q·Kᵀ, V only after P·V), so K no longer
// queues behind V's empty barrier, and V_j's bytes do not share the memory system with K_{j+1}'s.
template <typename Cfg, typename = void> struct KFirst : std::false_type {};
template <typename Cfg> struct KFirst<Cfg, std::void_t<decltype(Cfg::kKFirst)>>
    : std::integral_constant<bool, Cfg::kKFirst> {};

// Calls load_k(i) and load_v(i) for i = 0 .. n−1 in the order above.
template <bool kKFirst, typename LoadK, typename LoadV>
__device__ __forceinline__ void for_each_kv(int n, LoadK&& load_k, LoadV&& load_v) {
  if constexpr (kKFirst) {
    load_k(0);
    for (int i = 1; i < n; ++i) {
      load_k(i);
      load_v(i - 1);
    }
    load_v(n - 1);
  } else {
    for (int i = 0; i < n; ++i) {
      load_k(i);
      load_v(i);
    }
  }
}

// The n-th K (or V) tile through the ring goes to slot n % kStages, once that slot's previous tile was
// released: wait on its empty barrier with the flipped parity of pass n / kStages (a fresh barrier reads
// as released, so the ring starts empty), then issue(stage) its loads.
template <int kStages, typename Issue>
__device__ __forceinline__ void ring_acquire(int n, uint64_t* empty, Issue&& issue) {
  const int stage = n % kStages;
  mbarrier_wait(&empty[stage], ((n / kStages) & 1) ^ 1);
  issue(stage);
}

template <int kStages>
__device__ __forceinline__ void init_ring_barriers(uint64_t* full_q, uint64_t* full_k, uint64_t* full_v,
                                                   uint64_t* empty_k, uint64_t* empty_v, int consumer_warps) {
  mbarrier_init(full_q, 1);
  for (int s = 0; s < kStages; ++s) {
    mbarrier_init(&full_k[s], 1);
    mbarrier_init(&full_v[s], 1);
    mbarrier_init(&empty_k[s], consumer_warps);  // one arrival per consumer warp
    mbarrier_init(&empty_v[s], consumer_warps);
  }
  fence_barrier_init();
}

// The K and V tiles of one work tile, last to first (K/V rows (n_block_max − 1 − i)·kBlockN for tile i), tile
// i into ring slot (kv + i) % kStages, in for_each_kv's order; on_issue(is_v, i) runs once the slot is free,
// before its loads (the trace stamps). Tiles are (kBlockN, kHeadDim) 16-bit, stored as kHeadDim/64 swizzle
// atoms (one TMA box each). With a cluster of kCluster CTAs (ClusterM<Cfg>), CTA `rank` loads rows
// [rank·kRows, (rank+1)·kRows) of each tile and multicasts them to every CTA of the cluster; each CTA's
// full barrier expects the whole tile, and its empty barrier counts the consumer warps of all kCluster
// CTAs (a slot is refilled in every CTA at once, so every CTA must be done with it).
template <typename T, typename Cfg, typename OnIssue>
__device__ __forceinline__ void produce_kv(const CUtensorMap* tmap_k, const CUtensorMap* tmap_v, T* sK, T* sV,
                                           uint64_t* full_k, uint64_t* full_v, uint64_t* empty_k, uint64_t* empty_v,
                                           int h_kv, int b, int n_block_max, int kv, OnIssue&& on_issue) {
  constexpr int kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kTileElems = Cfg::kKVBytes / sizeof(T);
  constexpr int kCluster = ClusterM<Cfg>::value;
  constexpr int kRows = kBlockN / kCluster;
  const int rank = kCluster > 1 ? static_cast<int>(cluster_ctarank()) : 0;
  auto load = [&](int i, bool is_v, T* sX, const CUtensorMap* tmap, uint64_t* full, uint64_t* empty) {
    ring_acquire<kStages>(kv + i, empty, [&](int stage) {
      on_issue(is_v, i);
      mbarrier_arrive_expect_tx(&full[stage], Cfg::kKVBytes);
#pragma unroll
      for (int a = 0; a < Cfg::kAtoms; ++a) {
        T* dst = sX + stage * kTileElems + a * kBlockN * kAtomCols16 + rank * kRows * kAtomCols16;
        const int row = (n_block_max - 1 - i) * kBlockN + rank * kRows;
        if constexpr (kCluster > 1)
          tma_load_4d_multicast(dst, tmap, &full[stage], (1u << kCluster) - 1, a * kAtomCols16, row, h_kv, b);
        else
          tma_load_4d(dst, tmap, &full[stage], a * kAtomCols16, row, h_kv, b);
      }
    });
  };
  for_each_kv<KFirst<Cfg>::value>(
      n_block_max, [&](int i) { load(i, false, sK, tmap_k, full_k, empty_k); },
      [&](int i) { load(i, true, sV, tmap_v, full_v, empty_v); });
}

// Run by the whole producer warpgroup: one elected thread of warp 0 issues Q once and then K_j, V_j
// for every tile (produce_kv, from ring slot 0). In FA3_TRACE builds an idle lane of warp 1 also watches
// the full barriers and stamps when each tile landed.
template <typename T, typename Cfg>
__device__ __forceinline__ void produce_q_kv(const CUtensorMap* tmap_q, const CUtensorMap* tmap_k,
                                             const CUtensorMap* tmap_v, T* sQ, T* sK, T* sV, uint64_t* full_q,
                                             uint64_t* full_k, uint64_t* full_v, uint64_t* empty_k, uint64_t* empty_v, int m_block,
                                             int h, int h_kv, int b, int n_block_max, const FwdParams& p) {
  constexpr int kBlockM = Cfg::kBlockM;
#ifdef FA3_TRACE
  constexpr int kStages = Cfg::kStages;
  if (threadIdx.x / 32 == 1 && threadIdx.x % 32 == 0) {  // observer: stamps when each tile lands
    Tracer obs;
    obs.init(p, 1, true);
    for (int i = 0; i < n_block_max; ++i) {
      const int stage = i % kStages;
      const uint32_t phase = (i / kStages) & 1;
      if (mbarrier_try_wait(&full_k[stage], phase, 1 << 16)) obs.stamp(kArriveK, i);
      if (mbarrier_try_wait(&full_v[stage], phase, 1 << 16)) obs.stamp(kArriveV, i);
    }
    obs.finish();
  }
#endif
  if (threadIdx.x / 32 == 0 && elect_one()) {
    FA3_TRACE_DECL(tr);
    FA3_TRACE_INIT(tr, p, 0, true);
    tma_prefetch_descriptor(tmap_k);
    tma_prefetch_descriptor(tmap_v);
    // Q once
    mbarrier_arrive_expect_tx(full_q, Cfg::kQBytes);
#pragma unroll
    for (int a = 0; a < Cfg::kAtoms; ++a)
      tma_load_4d(sQ + a * kBlockM * kAtomCols16, tmap_q, full_q, a * kAtomCols16, m_block * kBlockM, h, b);
    produce_kv<T, Cfg>(tmap_k, tmap_v, sK, sV, full_k, full_v, empty_k, empty_v, h_kv, b, n_block_max, 0,
                       [&](bool is_v, int i) {
                         if (is_v) FA3_TRACE_STAMP(tr, kTmaIssueV, i);
                         else FA3_TRACE_STAMP(tr, kTmaIssueK, i);
                       });
    FA3_TRACE_FINISH(tr);
  }
}

// Persistent variant (steps 06+): one elected thread of warp 0 loads the Q tile and every K/V tile of one
// work tile, continuing the ring where the previous work tile left it. `kv` counts the K/V tiles put
// through the ring so far in this CTA (slot kv % kStages, pass kv / kStages); `q_iter` counts the work
// tiles so far. Q has its own empty barrier: the consumers release it after their last Q·Kᵀ of a
// tile, so the next tile's Q lands while they still run the last P·V and the epilogue.
// o_free (steps 08+, headdim 256 causal): the consumers stage the previous work tile's O in the V ring for its
// TMA store, so this tile's first V waits until both warpgroups' stores have read it (one arrival each per
// work tile; phase q_iter − 1, a fresh barrier reads as released) — FA3's barrier_O.
template <typename T, typename Cfg>
__device__ __forceinline__ void produce_tile(const CUtensorMap* tmap_q, const CUtensorMap* tmap_k,
                                             const CUtensorMap* tmap_v, T* sQ, T* sK, T* sV, uint64_t* full_q,
                                             uint64_t* empty_q, uint64_t* full_k, uint64_t* full_v, uint64_t* empty_k,
                                             uint64_t* empty_v, int m_block, int h, int h_kv, int b, int n_block_max,
                                             int kv, int q_iter, uint64_t* o_free = nullptr) {
  constexpr int kBlockM = Cfg::kBlockM;
  mbarrier_wait(empty_q, (q_iter & 1) ^ 1);  // a fresh barrier reads as released
  mbarrier_arrive_expect_tx(full_q, Cfg::kQBytes);
#pragma unroll
  for (int a = 0; a < Cfg::kAtoms; ++a)
    tma_load_4d(sQ + a * kBlockM * kAtomCols16, tmap_q, full_q, a * kAtomCols16, m_block * kBlockM, h, b);
  produce_kv<T, Cfg>(tmap_k, tmap_v, sK, sV, full_k, full_v, empty_k, empty_v, h_kv, b, n_block_max, kv,
                     [&](bool is_v, int i) {
                       if (o_free != nullptr && is_v && i == 0) mbarrier_wait(o_free, (q_iter & 1) ^ 1);
                     });
}

// A consumer warp's release of a ring slot (lane 0): its own CTA's empty barrier, and with a cluster
// (ClusterM<Cfg> > 1) the same barrier in every other CTA of the cluster, whose producer multicasts into
// this CTA's slot too.
template <typename Cfg>
__device__ __forceinline__ void release_slot(uint64_t* empty) {
  mbarrier_arrive(empty);
  if constexpr (ClusterM<Cfg>::value > 1) {
    const uint32_t me = cluster_ctarank();
#pragma unroll
    for (int r = 1; r < ClusterM<Cfg>::value; ++r) mbarrier_arrive_cluster(empty, (me + r) % ClusterM<Cfg>::value);
  }
}

}  // namespace fa3
