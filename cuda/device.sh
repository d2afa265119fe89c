#!/usr/bin/env bash
# One device call: install carried wheels, build the extension, smoke-check, run the GPU tests, time.
# Usage (from the repo root, on the GPU machine):  bash cuda/device.sh [smoke|test|bench|all|...]
# Results and logs go under $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 FA3_LAB_CACHE=${FA3_LAB_CACHE:-/tmp/fa3cache} MAX_JOBS=16
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
t0=$(date +%s)
python3 -c "from fa3_lab import _build; _build.load()" 2>&1 | tail -30 || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
for what in "$@"; do
  case "$what" in
    smoke) python3 cuda/smoke.py 2>&1 | tee "$OUT/smoke.log" ;;
    test) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_kernel.py -q -m gpu -x --maxfail=3 -rs 2>&1 | tail -40 | tee "$OUT/test.log" ;;
    memcheck|racecheck|synccheck)
      compute-sanitizer --tool "$what" --print-limit 20 python3 cuda/sanitize_case.py 2>&1 | tail -15 | tee "$OUT/$what.log" ;;
    trace) for st in 1 2 3 4; do python3 -m fa3_lab trace --step $st --out "$OUT/pack/traces" 2>&1 | tail -3; done ;;
    bench_ab128) FA3_LAB_DEFINES="-DFA3_BLOCK_N_HD128=128 -DFA3_STEP04_BLOCK_N_HD128=128" python3 -m fa3_lab bench --headdims 128 --dtypes bf16 --seqlens 2048,8192,16384 --name bench_bn128 2>&1 | tail -12 ;;
    pack) mkdir -p "$OUT/pack" && cp -r fa3_lab/results/nvidia-* "$OUT/pack/" 2>/dev/null; tar -C "$OUT/pack" -cf "$OUT/run.tar" . && rm -rf "$OUT/pack" && tar -tf "$OUT/run.tar" ;;
    gputests) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_kernel.py tests/test_integration.py tests/test_grading.py -q -m gpu -rs 2>&1 | tail -25 | tee "$OUT/gputests.log" ;;
    prefill) mkdir -p "$OUT/pack/experiments" && python3 -m fa3_lab.examples.llama_prefill --out "$OUT/pack/experiments/llama_prefill.json" 2>&1 | tail -40 ;;
    notebooks) python3 cuda/run_notebooks.py 2>&1 | tee "$OUT/notebooks.log"
      python3 -m pytest -p no:cacheprovider --nbval notebooks -q 2>&1 | tail -15 | tee "$OUT/nbval.log"
      mkdir -p "$OUT/pack/notebooks" && cp notebooks/0*.ipynb "$OUT/pack/notebooks/" ;;
    fp8test) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_fp8_kernel.py $(ls tests/test_fp8_quantize.py 2>/dev/null) -q -m gpu -rs 2>&1 | tail -25 | tee "$OUT/fp8test.log" ;;
    fp8sanitize) for tool in memcheck racecheck synccheck; do echo "== $tool"
      compute-sanitizer --tool $tool --print-limit 20 python3 cuda/sanitize_case.py --fp8 2>&1 | tail -4; done 2>&1 | tee "$OUT/fp8sanitize.log" ;;
    fp8bench) python3 -m fa3_lab bench --fp8 2>&1 | tail -30 ;;
    results) find fa3_lab/results -name '*.json' -mmin -30 | while read f; do d="$OUT/results/$(basename "$(dirname "$f")")"; mkdir -p "$d"; cp "$f" "$d/"; done; ls -R "$OUT/results" ;;
    ab_persist) python3 -m fa3_lab bench --steps 4 --dtypes bf16 --seqlens 1024,2048,4096,8192,16384 --name bench_persistent 2>&1 | tail -40
      FA3_LAB_DEFINES=-DFA3_STEP04_PERSISTENT=0 python3 -m fa3_lab bench --steps 4 --dtypes bf16 --seqlens 1024,2048,4096,8192,16384 --no-peers --name bench_nonpersistent 2>&1 | tail -40 ;;
    ab_causal) python3 -m fa3_lab bench --steps 4 --dtypes bf16 --headdims 64,128 --causal true --seqlens 1024,2048,4096,8192,16384 --no-peers --name bench_persistent_causal 2>&1 | tail -14
      FA3_LAB_DEFINES=-DFA3_STEP04_PERSISTENT=0 python3 -m fa3_lab bench --steps 4 --dtypes bf16 --headdims 64,128 --causal true --seqlens 1024,2048,4096,8192,16384 --no-peers --name bench_nonpersistent_causal 2>&1 | tail -14 ;;
    ab_fp8stages) FA3_LAB_DEFINES=-DFA3_STEP05_STAGES_HD128=4 python3 -m fa3_lab bench --fp8 --name bench_fp8_stages4 2>&1 | tail -12 ;;
    trace_nb04) for st in 1 2 3 4; do python3 -m fa3_lab trace --step $st 2>&1 | tail -2; done
      python3 -c "
import nbclient, nbformat
path = 'notebooks/04_pingpong_and_overlap.ipynb'
nb = nbformat.read(path, as_version=4)
nbclient.NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': 'notebooks'}}).execute()
nbformat.write(nb, path)
print(path, 'executed')" 2>&1 | grep -v WARNING
      python3 -m pytest -p no:cacheprovider --nbval notebooks/04_pingpong_and_overlap.ipynb -q 2>&1 | tail -3
      tar -cf "$OUT/trace_nb04.tar" fa3_lab/results/traces notebooks/04_pingpong_and_overlap.ipynb ;;
    ab_overlap) G="--steps 4 --dtypes bf16 --seqlens 2048,4096,8192,16384"
      python3 -m fa3_lab bench $G --name bench_overlap 2>&1 | tail -30
      FA3_LAB_DEFINES="-DFA3_STEP04_EARLY_RESCALE=0" python3 -m fa3_lab bench $G --no-peers --name bench_overlap_waitonly 2>&1 | tail -26
      FA3_LAB_DEFINES="-DFA3_WAIT_AFTER_SOFTMAX=0 -DFA3_STEP04_EARLY_RESCALE=0" python3 -m fa3_lab bench $G --no-peers --name bench_overlap_base 2>&1 | tail -26 ;;
    ncu_l2) for impl in step04 fa3; do echo "== $impl hd128 8k"
      ncu --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:'fwd_kernel|Flash|flash' --launch-skip 2 --launch-count 1 \
        python3 cuda/tools/profile_case.py --impl $impl --headdim 128 --seqlen 8192 2>&1 \
        | grep -E "Throughput|Hit Rate|Duration|Busy|Bandwidth|Max Bandwidth|Mem Pipes|SM Frequency|==PROF==|Error" | head -30; done 2>&1 | tee "$OUT/ncu_l2.log" ;;
    ab_rescale) python3 cuda/tools/ab.py --name ab_rescale --step 4 --variant base= --variant rescale=-DFA3_STEP04_EARLY_RESCALE=1 \
      --headdims 64,128,256 --seqlens 2048,8192 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -20
      mkdir -p "$OUT/r" && cp fa3_lab/results/experiments/*/ab_rescale_*.json "$OUT/r/" ;;
    ab_fp8persist) FA3_LAB_DEFINES=-DFA3_STEP05_PERSISTENT=0 python3 -m fa3_lab bench --fp8 --name bench_fp8_nonpersistent 2>&1 | tail -12 ;;
    ab_dynamic) python3 cuda/tools/ab.py --name ab_dynamic --step 4 --variant dynamic= --variant percta=-DFA3_STEP04_DYNAMIC=0 \
      --headdims 64,128,256 --causal true --seqlens 1024,2048,4096,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -20
      mkdir -p "$OUT/r" && cp fa3_lab/results/experiments/*/ab_dynamic_*.json "$OUT/r/" ;;
    ab_l2) python3 cuda/tools/ab.py --name ab_sched_l2 --step 4 --variant l2mb32= --variant l2mb8=-DFA3_SCHED_L2_MB=8 \
      --variant percta=-DFA3_STEP04_DYNAMIC=0 --headdims 64,128,256 --causal true --seqlens 2048,8192,16384 --rounds 3 2>&1 \
      | grep -v "^fa3_lab: compiling" | tail -14; mkdir -p "$OUT/r" && cp fa3_lab/results/experiments/*/ab_sched_l2_*.json "$OUT/r/" ;;
    ab_bn) python3 cuda/tools/ab.py --name ab_block_n --step 4 --variant base= --variant bn176causal=-DFA3_BLOCK_N_HD128_CAUSAL=176 \
      --variant bn192hd64=-DFA3_BLOCK_N_HD64=192 --headdims 64,128 --seqlens 2048,8192 --rounds 3 2>&1 \
      | grep -v "^fa3_lab: compiling" | tail -12; mkdir -p "$OUT/r" && cp fa3_lab/results/experiments/*/ab_block_n_*.json "$OUT/r/" ;;
    ab_wg3) python3 cuda/tools/ab.py --name ab_hd64_wg3 --step 4 --variant wg3= --variant wg2=-DFA3_STEP04_HD64_WG3=0 \
      --variant wg2bn192="-DFA3_STEP04_HD64_WG3=0 -DFA3_BLOCK_N_HD64=192" --headdims 64 --seqlens 2048,4096,8192,16384 \
      --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -14; mkdir -p "$OUT/r" && cp fa3_lab/results/experiments/*/ab_hd64_wg3_*.json "$OUT/r/" ;;
    ncu_causal) M=gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__cycles_active.avg,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_membar_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct,smsp__inst_executed_pipe_xu.sum,smsp__warp_issue_stalled_dispatch_stall_per_warp_active.pct,smsp__warp_issue_stalled_sleeping_per_warp_active.pct,smsp__warp_issue_stalled_selected_per_warp_active.pct,smsp__warp_issue_stalled_not_selected_per_warp_active.pct,smsp__warp_issue_stalled_misc_per_warp_active.pct,smsp__warp_issue_stalled_branch_resolving_per_warp_active.pct,smsp__warp_issue_stalled_no_instruction_per_warp_active.pct,smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct
      for c in "fa3 128 --causal" "fa3 256 --causal" "fa3 128 --no-causal"; do set -- $c; echo "== $c"
      ncu --metrics $M -k regex:'fwd_kernel|device_kernel' --launch-skip 2 --launch-count 1 python3 cuda/tools/profile_case.py --impl $1 --headdim $2 --seqlen 8192 $3 2>&1 \
        | grep -E "^\s+(gpu__|sm__|smsp__)|Error|==WARN|==ERR|device_kernel|fwd_kernel" | cut -c1-200 ; done 2>&1 | tee "$OUT/ncu_causal.log" ;;
    ab_issue) python3 cuda/tools/ab.py --name ab_issue --step 4 --variant new= --variant nolazy=-DFA3_LAZY_RESCALE=0 --headdims 64,128,256 --seqlens 2048,8192,16384 \
      --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -22; mkdir -p "$OUT/r" && cp fa3_lab/results/experiments/*/ab_issue_*.json "$OUT/r/" ;;
    ab_kfirst) V1="-DFA3_STEP04_K_FIRST=0 -DFA3_STEP04_WAIT_V_LATE=0"; V2="-DFA3_STEP04_WAIT_V_LATE=0"
      # (its s3 variant, -DFA3_STEP04_STAGES_HD128_CAUSAL=3 before 700ecb6, is gone: 3 stages were not adopted)
      for d in "" "$V1" "$V2"; do FA3_LAB_DEFINES="$d" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1 & done; wait
      echo "builds: $(( $(date +%s) - t0 )) s"
      python3 cuda/tools/ab.py --name ab_kfirst --step 4 --variant new= --variant old="$V1" --variant kfirst="$V2" \
        --headdims 64,128,256 --seqlens 2048,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -24
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_kfirst.tgz" fa3_lab/results/experiments/*/ab_kfirst_*.json ;;
    ab_pack) V1="-DFA3_STEP04_PACK_FIRST=0"; V2="-DFA3_STEP04_K_FIRST=0 -DFA3_STEP04_WAIT_V_LATE=0"; V3="-DFA3_LAZY_RESCALE=0"
      for d in "$V1" "$V2" "$V3"; do FA3_LAB_DEFINES="$d" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1 & done; wait
      echo "builds: $(( $(date +%s) - t0 )) s"
      python3 cuda/tools/ab.py --name ab_pack --step 4 --variant new= --variant packlast="$V1" --variant oldorder="$V2" --variant nolazy="$V3" \
        --headdims 64,128,256 --seqlens 2048,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -24
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_pack.tgz" fa3_lab/results/experiments/*/ab_pack_*.json ;;
    ab_tma) V1="-DFA3_STEP04_TMA_STORE=0"
      FA3_LAB_DEFINES="$V1" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1
      python3 cuda/tools/ab.py --name ab_tma --step 4 --variant tma= --variant notma="$V1" \
        --headdims 64,128 --seqlens 1024,2048,4096,8192 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -18
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_tma.tgz" fa3_lab/results/experiments/*/ab_tma_*.json ;;
    ab_bn160) V1="-DFA3_STEP04_BLOCK_N_HD128=176"; V2="-DFA3_STEP04_TMA_STORE=0"
      for d in "$V1" "$V2"; do FA3_LAB_DEFINES="$d" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1 & done; wait
      python3 cuda/tools/ab.py --name ab_bn160 --step 4 --variant bn160tma= --variant bn176="$V1" --variant bn160="$V2" \
        --headdims 128 --causal false --seqlens 1024,2048,4096,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -10
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_bn160.tgz" fa3_lab/results/experiments/*/ab_bn160_*.json ;;
    ab_tma256) V1="-DFA3_STEP04_TMA_STORE=0"
      FA3_LAB_DEFINES="$V1" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1
      python3 cuda/tools/ab.py --name ab_tma256 --step 4 --variant tma= --variant notma="$V1" \
        --headdims 256 --seqlens 1024,2048,4096,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -12
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_tma256.tgz" fa3_lab/results/experiments/*/ab_tma256_*.json ;;
    ab_oinv128) V1="-DFA3_STEP04_BLOCK_N_HD128=176 -DFA3_STEP04_CLUSTER=0"; V2="-DFA3_STEP04_CLUSTER=0"
      for d in "$V1" "$V2"; do FA3_LAB_DEFINES="$d" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1 & done; wait
      python3 cuda/tools/ab.py --name ab_oinv128 --step 4 --variant own160cl= --variant inv176="$V1" --variant own160="$V2" \
        --headdims 128 --causal false --seqlens 1024,2048,4096,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -10
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_oinv128.tgz" fa3_lab/results/experiments/*/ab_oinv128_*.json ;;
    ab_fp8kfirst) V1="-DFA3_STEP05_K_FIRST=0"
      FA3_LAB_DEFINES="$V1" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1
      python3 cuda/tools/ab.py --name ab_fp8_kfirst --step 5 --variant new= --variant old="$V1" \
        --headdims 128,256 --causal false --seqlens 4096,8192,16384 --rounds 5 2>&1 | grep -v "^fa3_lab: compiling" | tail -10
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_fp8_kfirst.tgz" fa3_lab/results/experiments/*/ab_fp8_kfirst_*.json ;;
    ncu_mem) M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,lts__t_sector_hit_rate.pct,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_global_st.sum,lts__t_sectors_srcunit_tex_op_write.sum
      for c in "step04 --no-causal 16384" "fa3 --no-causal 16384" "step04 --causal 8192" "fa3 --causal 8192"; do set -- $c; echo "== $c"
      ncu --metrics $M -k regex:'fwd_kernel|device_kernel' --launch-skip 2 --launch-count 1 python3 cuda/tools/profile_case.py --impl $1 --headdim 128 --seqlen $3 $2 2>&1 \
        | grep -E "^\s+(gpu__|sm__|smsp__|dram__|lts__|l1tex__)|Error|==ERR" | cut -c1-160; done 2>&1 | tee "$OUT/ncu_mem.log" ;;
    ab_cluster) V1="-DFA3_STEP04_CLUSTER=0"
      FA3_LAB_DEFINES="$V1" python3 -c "from fa3_lab import _build; _build.load()" >/dev/null 2>&1
      python3 cuda/tools/ab.py --name ab_cluster --step 4 --variant cluster= --variant nocluster="$V1" \
        --headdims 128 --causal false --seqlens 1024,2048,4096,8192,16384 --rounds 3 2>&1 | grep -v "^fa3_lab: compiling" | tail -8
      mkdir -p "$OUT/r" && tar -czf "$OUT/r/ab_cluster.tgz" fa3_lab/results/experiments/*/ab_cluster_*.json ;;
    clocks) for c in "--headdim 128" "--headdim 128 --causal --seqlen 8192" "--headdim 64"; do
      python3 cuda/tools/clocks.py $c 2>&1 | tail -6; done 2>&1 | tee "$OUT/clocks.log" ;;
    ncu_src) for c in "step04 128 --causal 8192" "fa3 128 --causal 8192" "step04 128 --no-causal 16384" "fa3 128 --no-causal 16384"; do
      set -- $c; tag=$1_$2${3#--}_$4; echo "== $tag"
      ncu --section WarpStateStats --section SourceCounters -k regex:'fwd_kernel|device_kernel' --launch-skip 2 --launch-count 1 \
        -f -o /tmp/ncu_$tag python3 cuda/tools/profile_case.py --impl $1 --headdim $2 --seqlen $4 $3 2>&1 | grep -E "==ERR|==WARN|Error" | head -5
      mkdir -p /tmp/src; ncu -i /tmp/ncu_$tag.ncu-rep --page source --csv --print-source sass > /tmp/src/$tag.csv 2>/tmp/src/$tag.err
      ncu -i /tmp/ncu_$tag.ncu-rep --page details --csv > /tmp/src/${tag}_details.csv 2>&1
      wc -c /tmp/src/$tag.csv; head -c 600 /tmp/src/$tag.err; done
      mkdir -p "$OUT/r" && tar -C /tmp -czf "$OUT/r/ncu_src.tgz" src && ls -la "$OUT/r" ;;
    regime) python3 cuda/tools/regime.py --out "$OUT/regime.json" 2>&1 | tee "$OUT/regime.log" ;;
    table3) python3 -m fa3_lab table3 --emulate 2>&1 | tail -20 ;;
    sanitize234) for tool in racecheck synccheck memcheck; do echo "== $tool"
      compute-sanitizer --tool $tool --print-limit 20 python3 cuda/sanitize_case.py 2 3 4 2>&1 | tail -4; done 2>&1 | tee "$OUT/sanitize234.log" ;;
    sanitize4) for tool in racecheck synccheck memcheck; do echo "== $tool"
      compute-sanitizer --tool $tool --print-limit 20 python3 cuda/sanitize_case.py 4 2>&1 | tail -4; done 2>&1 | tee "$OUT/sanitize4.log" ;;
    info) python3 -m fa3_lab info 2>&1 | tee "$OUT/info.log" ;;
    tour) python3 -m fa3_lab tour 2>&1 | tee "$OUT/tour.log" ;;
    bench) python3 -m fa3_lab bench 2>&1 | tail -80 ;;
    ablation) python3 -m fa3_lab bench --ablation 2>&1 | tail -20 ;;
    collect) mkdir -p "$OUT" && cp -r fa3_lab/results/nvidia-* "$OUT/" 2>/dev/null; ls -R "$OUT" ;;
    testall) python3 -m pytest -o addopts="" -p no:cacheprovider tests/test_kernel.py -q -m gpu -rs 2>&1 | tail -30 | tee "$OUT/test.log" ;;
    *) echo "unknown action $what" ;;
  esac
done
