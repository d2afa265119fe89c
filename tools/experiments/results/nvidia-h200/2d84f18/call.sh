# session 17, call D: trace of step 25 at headdim 128 (2k, 8k non-causal): the consumers' skew and the ring waits
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=10,25 FA3_LAB_COMMIT=$(cat ../g.commit)
python3 -c "from fa3_lab import _build; _build.load(); _build.load(traced=True)" > $L/build.log 2>&1; tail -1 $L/build.log; echo "BUILD $(el) s"
timeout -k 5 120 python3 tools/experiments/bwd_trace.py --step 25 --headdim 128 --seqlens 2048,8192 --out $OUT > $L/trace128.log 2>&1; grep -v Warn $L/trace128.log | tail -24; echo "T128 $(el) s"
