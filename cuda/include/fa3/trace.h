// fa3/trace.h — pipeline timelines (FA3_TRACE builds only; without it every macro is empty, so the
// untraced kernels are byte-for-byte the same code).
//
// Buffer (FwdParams::trace): int64 (trace_ctas, kTraceRows, trace_capacity records × 2 words).
//   row 0 = TMA issue (the producer's elected thread; step 01: thread 0), row 1 = TMA arrival (an
//   otherwise idle producer warp that watches the full barriers), rows 2, 3 = consumer warpgroups 0, 1.
//   Backward (BwdParams::trace, step 18): row 1 is the dQ writer warp instead.
//   record 0 of a row: {clock64 at CTA start, (smid << 32) | kTraceHeader}; record 1: {%globaltimer
//   at start, %globaltimer at end}; then events {clock64, (code << 32) | tile index}.
// clock64 (SM cycles) gives the resolution; the two %globaltimer stamps convert cycles to ns.
// One thread per warpgroup records; only CTAs with linear index < trace_ctas record.
#pragma once
#include <cstdint>

namespace fa3 {

constexpr int kTraceRows = 4;

enum TraceCode : uint32_t {
  kTraceHeader = 0xFFFF,
  kTmaIssueK = 1, kTmaIssueV = 2, kArriveK = 3, kArriveV = 4,          // producer row
  kGemm0Issue = 10, kGemm0Done = 11, kSoftmaxBegin = 12, kSoftmaxEnd = 13,  // consumer rows
  kGemm1Issue = 14, kGemm1Done = 15,
  // backward: producer row (tile = m_block), dQ writer row, consumer rows
  kBwdIssueKV = 20, kBwdIssueQ = 21, kBwdDqFull = 22, kBwdDqAdded = 23,
  kBwdKVReady = 24, kBwdIterBegin = 25, kBwdIterEnd = 26, kBwdEpilogueEnd = 27,
};

#ifdef FA3_TRACE
constexpr bool kTraceBuild = true;  // configs that trace one tile per CTA and two consumers read this
struct Tracer {
  int64_t* rec = nullptr;  // this row's records, or null when this thread does not record
  int n = 0, cap = 0;
  template <class Params>  // FwdParams or BwdParams
  __device__ __forceinline__ void init(const Params& p, int row, bool recorder) {
    const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (!recorder || p.trace == nullptr || cta >= p.trace_ctas) return;
    cap = p.trace_capacity;
    rec = reinterpret_cast<int64_t*>(p.trace) + (static_cast<int64_t>(cta) * kTraceRows + row) * 2 * cap;
    uint32_t smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    rec[0] = clock64();
    rec[1] = (static_cast<int64_t>(smid) << 32) | kTraceHeader;
    rec[2] = static_cast<int64_t>(globaltimer());
    n = 2;
  }
  __device__ __forceinline__ void stamp(TraceCode code, int tile) {
    if (rec != nullptr && n < cap) {
      rec[2 * n] = clock64();
      rec[2 * n + 1] = (static_cast<int64_t>(code) << 32) | static_cast<uint32_t>(tile);
      ++n;
    }
  }
  __device__ __forceinline__ void finish() {
    if (rec != nullptr) rec[3] = static_cast<int64_t>(globaltimer());
  }
};
#define FA3_TRACE_DECL(name) ::fa3::Tracer name
#define FA3_TRACE_INIT(name, p, row, recorder) name.init(p, row, recorder)
#define FA3_TRACE_STAMP(name, code, tile) name.stamp(::fa3::code, tile)
#define FA3_TRACE_FINISH(name) name.finish()
#else
constexpr bool kTraceBuild = false;
#define FA3_TRACE_DECL(name)
#define FA3_TRACE_INIT(name, p, row, recorder)
#define FA3_TRACE_STAMP(name, code, tile)
#define FA3_TRACE_FINISH(name)
#endif

}  // namespace fa3
