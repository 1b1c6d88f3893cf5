#!/usr/bin/env bash
# Throwaway: (1) the call-5 KV-head gates distilled 8,000 steps further (--init-gates, lr 5e-4, warmup 500, seed 1),
# then seer with them at 0.1 (8 sequences, 36 passkeys, dense last row); (2) side by side, 108 passkeys (12 per
# length and depth) at 0.1 with the dense last row for seer with the call-5 query-head gates and the oracle.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
[[ -d runs/carry/base_call4 ]] || tar xJf runs/carry/base.txz -C runs/carry
[[ -f runs/c5/gates_kv/gates.safetensors ]] || { mkdir -p runs/c5 && tar xzf runs/carry/gates.tgz -C runs/c5; }
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
common=(--model runs/carry/base_call4 --data embedded:heldout --seq-len 16384 --retrieval-lengths 4096,8192,16384
        --no-progress --dense-last-rows 1)
timeout 400 seerjax eval "${common[@]}" --gates runs/c5/gates_query --methods seer,oracle --densities 0.1 \
  --num-sequences 1 --retrieval-samples 12 --out runs/e7/r108 > runs/e7_r108.log 2>&1 &
d() {  # steps
  seerjax distill --model runs/carry/base_call4 --data embedded:train --seq-len 16384 --steps $1 --out runs/c7/kv_more \
    --gate-heads kv --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 5e-4 --skip-fraction 0 \
    --warmup 500 --q-sub-blocks 8 --k-sub-blocks 8 --save-every 2000 --retrieval-docs 4000 --seed 1 \
    --init-gates runs/c5/gates_kv --no-progress
}
timeout 330 bash -c "$(declare -f d); d 8000" > runs/c7_kv.log 2>&1
if [[ ! -f runs/c7/kv_more/gates.safetensors ]]; then
  s=$(ls runs/c7/kv_more/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "kv_more: export at $s"; d $s >> runs/c7_kv.log 2>&1
fi
echo "distill secs=$(( $(date +%s) - t0 ))"
grep -v "Map:" runs/c7_kv.log | grep -i "error\|Traceback" | head -n 3
python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/c7/kv_more/metrics.jsonl')]
print('kv_more', m[-1]['step'], 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4))
open('$OUT/kv_more_metrics_every50.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
tar czf $OUT/kv_more.tgz -C runs/c7 kv_more/gates.safetensors kv_more/gate_config.json
timeout $(( 560 - ($(date +%s) - t0) )) seerjax eval --model runs/carry/base_call4 --gates runs/c7/kv_more --methods seer \
  --data embedded:heldout --seq-len 16384 --densities 0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 \
  --retrieval-samples 4 --dense-last-rows 1 --no-progress --out runs/e7/kv > runs/e7_kv.log 2>&1
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for x in r108 kv; do cp runs/e7/$x/results.json $OUT/$x.json 2>/dev/null; grep '^|' runs/e7_$x.log || tail -n 4 runs/e7_$x.log; done
