#!/usr/bin/env bash
# Throwaway: the 18k-step KV-head gates distilled further at 16k (warm start, lr 5e-4, as call 8 of the thirteenth
# session did for the query-head gates), then seer evaluated with them, with and without the dense last row.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
d() {  # steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $1 --out runs/g16/gkv --gate-heads kv \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 5e-4 --skip-fraction 0 --warmup 500 \
    --save-every 2500 --retrieval-docs 4000 --seed 1 --init-gates runs/g16/gates_kv --no-progress
}
timeout 300 bash -c "$(declare -f d); d 18000" > $OUT/distill.log 2>&1
echo "distill rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/distill.log
if [[ ! -f runs/g16/gkv/gates.safetensors ]]; then
  s=$(ls runs/g16/gkv/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1)
  echo "export at $s" | tee -a $OUT/distill.log
  d $s >> $OUT/distill.log 2>&1
fi
python3 -c "
import json; m=[json.loads(l) for l in open('runs/g16/gkv/metrics.jsonl')]
open('$OUT/distill_metrics_every50.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
tar czf $OUT/gkv.tgz -C runs/g16/gkv gates.safetensors gate_config.json
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two evaluations share the GPU
left=$(( 590 - ($(date +%s) - t0) ))
common=(--model runs/carry/base16 --gates runs/g16/gkv --methods seer --data embedded:heldout --seq-len 16384
        --densities 0.5,0.25,0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress)
timeout $left seerjax eval "${common[@]}" --dense-last-rows 1 --out runs/g16/e_row > runs/g16/e_row.log 2>&1 &
timeout $left seerjax eval "${common[@]}" --out runs/g16/e_norow > runs/g16/e_norow.log 2>&1 &
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for x in row norow; do cp runs/g16/e_$x/results.json $OUT/eval_$x.json 2>/dev/null; grep "^|" runs/g16/e_$x.log || tail -n 4 runs/g16/e_$x.log; done
grep -v "Map:" $OUT/distill.log | tail -n 3
