#!/usr/bin/env bash
# Throwaway: the gate's scoring grain, second round, three runs side by side (lr 3e-4): call 1's 4×4 sub-block
# gates 7,000 steps further (g44b), and from the 44k-step gates 6,000 steps each at 1 query × 4 key sub-blocks (g14)
# and 8 × 8 (g88). Then seer at 0.1 with the dense last row with each (8 sequences, 18 passkeys).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16 g16/gq44k
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
d() {  # name q_sub k_sub steps init
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $4 --out runs/$1 --gate-heads query \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 3e-4 --skip-fraction 0 --warmup 601 \
    --q-sub-blocks $2 --k-sub-blocks $3 --init-gates $5 --save-every 1000 --retrieval-docs 4000 --no-progress
}
run() {  # name q_sub k_sub steps init
  timeout 310 bash -c "$(declare -f d); d $1 $2 $3 $4 $5" > runs/$1.log 2>&1
  if [[ ! -f runs/$1/gates.safetensors ]]; then
    s=$(ls runs/$1/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "$1: export at $s"; d $1 $2 $3 $s $5 >> runs/$1.log 2>&1
  fi
}
run g44b 4 4 7000 runs/s15/g44 & run g14 1 4 6000 runs/g16/gq44k & run g88 8 8 6000 runs/g16/gq44k &
wait
echo "distill secs=$(( $(date +%s) - t0 ))"
for g in g44b g14 g88; do
  grep -v "Map:" runs/$g.log | grep -i "error\|Traceback" | head -n 3
  python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/$g/metrics.jsonl')]
print('$g', m[-1]['step'], 'first-200 loss', round(statistics.mean(r['loss'] for r in m[:200]),4), 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4), 'step_s', round(statistics.median(r['step_s'] for r in m[100:]),4))"
done
tar czf $OUT/gates.tgz -C runs g44b/gates.safetensors g44b/gate_config.json g14/gates.safetensors g14/gate_config.json g88/gates.safetensors g88/gate_config.json
left=$(( 585 - ($(date +%s) - t0) ))
for g in g44b g14 g88; do
  timeout $left seerjax eval --model runs/carry/base16 --gates runs/$g --methods seer --data embedded:heldout --seq-len 16384 \
    --densities 0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 2 --dense-last-rows 1 \
    --no-progress --out runs/e_$g > runs/e_$g.log 2>&1 &
done
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for g in g44b g14 g88; do cp runs/e_$g/results.json $OUT/eval_$g.json 2>/dev/null; echo $g; grep "^| seer\|^| dense" runs/e_$g.log || tail -n 4 runs/e_$g.log; done
