# session 18, call A: where step 26's headdim-128 non-causal loop waits: kernel times, trace, ncu (ours vs cuDNN, 2k)
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,26 FA3_LAB_COMMIT=$(cat ../g.commit)
python3 -c "from fa3_lab import _build; _build.load(); _build.load(traced=True)" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 90 python3 tools/experiments/bwd_kernel_times.py --step 26 --headdim 128 --seqlens 2048,8192,16384 > $L/ktimes26.log 2>&1; cat $L/ktimes26.log | grep -v Warn; echo "KT $(el) s"
timeout -k 5 120 python3 tools/experiments/bwd_trace.py --step 26 --headdim 128 --seqlens 2048,8192 --out $OUT > $L/trace128.log 2>&1; grep -v Warn $L/trace128.log | tail -24; echo "T128 $(el) s"
timeout -k 5 200 ncu --clock-control none --set full --import-source no -k regex:"bwd_kernel|bprop" -c 2 -o $L/ncu26 python3 tools/experiments/ncu_bwd_case.py --step 26 --headdim 128 --seqlens 2048 > $L/ncu_run.log 2>&1; echo "NCU rc=$? $(el) s"; tail -3 $L/ncu_run.log
ncu --import $L/ncu26.ncu-rep --page details --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy > $L/ncu26_details.txt 2>&1
ncu --import $L/ncu26.ncu-rep --page raw --csv > $L/ncu26_raw.csv 2>&1
ncu --import $L/ncu26.ncu-rep --page source --csv --print-source sass -k regex:"bwd_kernel" > $L/ncu26_source.csv 2>&1
ls -la $L; echo "DONE $(el) s"
grep -E "Duration|SM Frequency|Compute \(SM\)|L1/TEX Cache|Issue Slots|Warp Cycles Per Issued|Shared|Tensor|Bank" $L/ncu26_details.txt | head -60
