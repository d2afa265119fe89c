# session 17, call C: every forward step at six shapes (ablation_steps.json, the same commit as the recorded run) + notebook 09 live
cd "$(dirname "$0")/g"
export L=/tmp/L; mkdir -p $L; trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
export T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../../.whl/*.whl > $L/pip.log 2>&1 || echo WHEELS FAILED
rm -f fa3_lab/results/nvidia-h200/*.json
export PYTHONPATH=$PWD FA3_LAB_CACHE=/tmp/fa3cache MAX_JOBS=16 PYTHONUNBUFFERED=1 FA3_LAB_STEPS=1,2,3,4,5,6,7,8,9,10 FA3_LAB_COMMIT=$(cat ../g.commit)
timeout -k 5 330 python3 tools/experiments/grid_vs_base.py --base-cuda ../base/cuda --base-commit cfb378a --no-grid --ablation --rounds 5 --out $OUT > $L/abl_steps.log 2>&1; echo "ABLSTEPS rc=$? $(el) s"
grep "^ABL\|built" $L/abl_steps.log
