// fa3/producer_fp8.h — step 05's producer: the e4m3 loads of Q, K and Vᵀ into step 02's ring.
//
// As produce_q_kv (producer.h), with e4m3 tiles: Q and K rows of kHeadDim bytes in atoms of Cfg::kSw bytes
// (64 at headdim 64, else 128), and V already transposed by the quantize kernel (cuda/fp8_quantize.cu) to
// (headdim, keys), so one TMA box of (kBlockN keys, kHeadDim rows) per tile lands K-major for P·V.
#pragma once
#include <cstdint>

#include "producer.h"
#include "ptx.h"

namespace fa3 {

template <typename Cfg>
__device__ __forceinline__ void produce_q_kv_fp8(const CUtensorMap* tmap_q, const CUtensorMap* tmap_k,
                                                 const CUtensorMap* tmap_vt, uint8_t* sQ, uint8_t* sK, uint8_t* sVt,
                                                 uint64_t* full_q, uint64_t* full_k, uint64_t* full_v,
                                                 uint64_t* empty_k, uint64_t* empty_v, int m_block, int h, int h_kv,
                                                 int b, int n_block_max) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages, kSw = Cfg::kSw;
  if (threadIdx.x / 32 != 0 || !elect_one()) return;
  mbarrier_arrive_expect_tx(full_q, Cfg::kQBytes);  // Q once
#pragma unroll
  for (int a = 0; a < Cfg::kAtoms; ++a)
    tma_load_4d(sQ + a * kBlockM * kSw, tmap_q, full_q, a * kSw, m_block * kBlockM, h, b);
  auto load_k = [&](int i) {  // K/V tile i: ring slot i % kStages (ring_acquire)
    ring_acquire<kStages>(i, empty_k, [&](int stage) {
      mbarrier_arrive_expect_tx(&full_k[stage], Cfg::kKBytes);
#pragma unroll
      for (int a = 0; a < Cfg::kAtoms; ++a)
        tma_load_4d(sK + stage * Cfg::kKBytes + a * kBlockN * kSw, tmap_k, &full_k[stage], a * kSw,
                    (n_block_max - 1 - i) * kBlockN, h_kv, b);
    });
  };
  auto load_v = [&](int i) {  // Vᵀ box: (kBlockN keys, kHeadDim rows) at key n_block·kBlockN
    ring_acquire<kStages>(i, empty_v, [&](int stage) {
      mbarrier_arrive_expect_tx(&full_v[stage], Cfg::kVBytes);
      tma_load_4d(sVt + stage * Cfg::kVBytes, tmap_vt, &full_v[stage], (n_block_max - 1 - i) * kBlockN, 0, h_kv, b);
    });
  };
  for_each_kv<Cfg::kKFirst>(n_block_max, load_k, load_v);
}

}  // namespace fa3
