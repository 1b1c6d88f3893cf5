#!/usr/bin/env bash
# Throwaway: KV-head gates at 8×8 sub-blocks from scratch (lr 1e-3, 12,000 steps, alone on the GPU), then seer with
# them at 0.5 / 0.25 / 0.1 with the dense last row (8 sequences, 36 passkeys).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
d() {  # steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $1 --out runs/kvs --gate-heads kv \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 1e-3 --skip-fraction 0 --warmup 1201 \
    --q-sub-blocks 8 --k-sub-blocks 8 --save-every 2000 --retrieval-docs 4000 --no-progress
}
timeout 300 bash -c "$(declare -f d); d 12000" > runs/kvs.log 2>&1
if [[ ! -f runs/kvs/gates.safetensors ]]; then
  s=$(ls runs/kvs/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "kvs: export at $s"; d $s >> runs/kvs.log 2>&1
fi
echo "distill secs=$(( $(date +%s) - t0 ))"
grep -v "Map:" runs/kvs.log | grep -i "error\|Traceback" | head -n 3
python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/kvs/metrics.jsonl')]
print('kvs', m[-1]['step'], 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4), 'step_s', round(statistics.median(r['step_s'] for r in m[100:]),4))
open('$OUT/kvs_metrics_every50.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
tar czf $OUT/kvs.tgz -C runs kvs/gates.safetensors kvs/gate_config.json
timeout $(( 585 - ($(date +%s) - t0) )) seerjax eval --model runs/carry/base16 --gates runs/kvs --methods seer --data embedded:heldout \
  --seq-len 16384 --densities 0.5,0.25,0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 \
  --dense-last-rows 1 --no-progress --out runs/ekvs > runs/ekvs.log 2>&1
echo "total secs=$(( $(date +%s) - t0 ))"
cp runs/ekvs/results.json $OUT/ekvs.json 2>/dev/null; grep "^| seer\|^| dense" runs/ekvs.log || tail -n 4 runs/ekvs.log
