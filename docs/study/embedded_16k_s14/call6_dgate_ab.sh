#!/usr/bin/env bash
# Throwaway: does gate capacity close the oracle gap? Query-head gates with d_gate 128 and 256, 12,000 steps each
# from scratch (same data, seed, lr 1e-3, warmup 1,201), side by side; then seer at 0.1 with each (8 sequences).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
d() {  # d_gate steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $2 --out runs/ab/d$1 --gate-heads query \
    --block-size 64 --d-gate $1 --gate-type Qavgmax_Kmaxminavg --lr 1e-3 --skip-fraction 0 --warmup 1201 \
    --save-every 3000 --retrieval-docs 4000 --no-progress
}
mkdir -p runs/ab
for g in 128 256; do timeout 330 bash -c "$(declare -f d); d $g 12000" > runs/ab/log$g 2>&1 & done
wait
echo "distill secs=$(( $(date +%s) - t0 ))"
for g in 128 256; do
  if [[ ! -f runs/ab/d$g/gates.safetensors ]]; then
    s=$(ls runs/ab/d$g/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "d$g export at $s"; d $g $s >> runs/ab/log$g 2>&1
  fi
  grep -v "Map:" runs/ab/log$g | tail -n 1
  python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/ab/d$g/metrics.jsonl')]
print('d$g', m[-1]['step'], 'last-1000 loss', statistics.mean(r['loss'] for r in m[-1000:]), 'step_s', statistics.median(r['step_s'] for r in m[100:]))
open('$OUT/metrics_d$g.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
done
left=$(( 590 - ($(date +%s) - t0) ))
for g in 128 256; do
  timeout $left seerjax eval --model runs/carry/base16 --gates runs/ab/d$g --methods seer --data embedded:heldout --seq-len 16384 \
    --densities 0.1 --num-sequences 8 --no-progress --out runs/ab/e$g > runs/ab/e$g.log 2>&1 &
done
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for g in 128 256; do cp runs/ab/e$g/results.json $OUT/eval_d$g.json 2>/dev/null; grep "^| seer\|^| dense" runs/ab/e$g.log || tail -n 4 runs/ab/e$g.log; done
