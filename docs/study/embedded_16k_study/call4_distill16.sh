#!/usr/bin/env bash
# Throwaway: query-head and KV-head gates distilled side by side at 16k from the carried base16 model. A 120-step
# probe of both measures the step time; the real runs get as many steps as fit in what is left of the call.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed" | tee -a $OUT/install.log
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
d() {  # heads steps out
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $2 --out $3 --gate-heads $1 \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 1e-3 --skip-fraction 0 --warmup $(( $2 / 10 + 1 )) \
    --save-every $(( $2 > 2000 ? 2000 : $2 )) --retrieval-docs 4000 --no-progress
}
d query 120 runs/probe/q > $OUT/probe_q.log 2>&1 &
d kv 120 runs/probe/kv > $OUT/probe_kv.log 2>&1 &
wait
probe=$(( $(date +%s) - t0 ))
step_s=$(python3 -c "
import json,statistics
m=[json.loads(l) for l in open('runs/probe/q/metrics.jsonl')]+[json.loads(l) for l in open('runs/probe/kv/metrics.jsonl')]
print(max(statistics.median(x['step_s'] for x in m[20:120]), statistics.median(x['step_s'] for x in m[140:])))")
left=$(( 585 - probe - $(date +%s) + t0 + probe ))
steps=$(python3 -c "print(int(($left - $probe - 25) / ($step_s + 0.0015) / 1000) * 1000)")
echo "probe ${probe}s, step ${step_s}s, left ${left}s -> $steps steps" | tee $OUT/plan.txt
d query $steps runs/g16/gates_query > $OUT/distill_q.log 2>&1 &
d kv $steps runs/g16/gates_kv > $OUT/distill_kv.log 2>&1 &
wait
echo "distill done at $(( $(date +%s) - t0 ))s" | tee -a $OUT/plan.txt
for h in query kv; do ls runs/g16/gates_$h | head -20; done >> $OUT/plan.txt
tar czf $OUT/gates16.tgz -C runs/g16 --exclude='gates_*/[0-9]*' gates_query gates_kv
cp runs/g16/gates_query/metrics.jsonl $OUT/metrics_q.jsonl; cp runs/g16/gates_kv/metrics.jsonl $OUT/metrics_kv.jsonl
tail -n 2 $OUT/distill_q.log $OUT/distill_kv.log; ls -la $OUT
