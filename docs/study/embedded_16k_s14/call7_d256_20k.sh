#!/usr/bin/env bash
# Throwaway: query-head gates with d_gate 256, 20,000 steps from scratch, alone on the GPU (lr 1e-3, warmup 2,001),
# then seer at 0.25 / 0.1 with and without the dense last row (8 sequences, 36 passkeys).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
d() {  # steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $1 --out runs/d256 --gate-heads query \
    --block-size 64 --d-gate 256 --gate-type Qavgmax_Kmaxminavg --lr 1e-3 --skip-fraction 0 --warmup 2001 \
    --save-every 3000 --retrieval-docs 4000 --no-progress
}
timeout 290 bash -c "$(declare -f d); d 20000" > runs/d256.log 2>&1
echo "distill rc=$? secs=$(( $(date +%s) - t0 ))"
if [[ ! -f runs/d256/gates.safetensors ]]; then
  s=$(ls runs/d256/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "export at $s"; d $s >> runs/d256.log 2>&1
fi
grep -v "Map:" runs/d256.log | tail -n 1
python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/d256/metrics.jsonl')]
print(m[-1]['step'], 'last-2000 loss', statistics.mean(r['loss'] for r in m[-2000:]), 'step_s', statistics.median(r['step_s'] for r in m[100:]))
open('$OUT/metrics_every50.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
tar czf $OUT/d256.tgz -C runs/d256 gates.safetensors gate_config.json
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two evaluations share the GPU
left=$(( 590 - ($(date +%s) - t0) ))
common=(--model runs/carry/base16 --gates runs/d256 --methods seer --data embedded:heldout --seq-len 16384 --densities 0.25,0.1
        --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress)
timeout $left seerjax eval "${common[@]}" --out runs/e_norow > runs/e_norow.log 2>&1 &
timeout $left seerjax eval "${common[@]}" --dense-last-rows 1 --out runs/e_row > runs/e_row.log 2>&1 &
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for x in norow row; do cp runs/e_$x/results.json $OUT/eval_$x.json 2>/dev/null; grep "^| seer\|^| dense" runs/e_$x.log || tail -n 4 runs/e_$x.log; done
