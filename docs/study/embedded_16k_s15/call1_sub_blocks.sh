#!/usr/bin/env bash
# Throwaway: the gate's scoring grain. The 44k-step query-head gates, warm-started three ways side by side for
# 6,000 steps (lr 3e-4): whole blocks (control: as much extra training, same grain), 4 query sub-blocks, and
# 4 query × 4 key sub-blocks. Then seer at 0.1 with the dense last row with each (8 sequences, 18 passkeys).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16 g16/gq44k
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
d() {  # name q_sub k_sub steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $4 --out runs/$1 --gate-heads query \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 3e-4 --skip-fraction 0 --warmup 601 \
    --q-sub-blocks $2 --k-sub-blocks $3 --init-gates runs/g16/gq44k --save-every 1000 --retrieval-docs 4000 --no-progress
}
run() {  # name q_sub k_sub
  timeout 300 bash -c "$(declare -f d); d $1 $2 $3 6000" > runs/$1.log 2>&1
  if [[ ! -f runs/$1/gates.safetensors ]]; then
    s=$(ls runs/$1/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "$1: export at $s"; d $1 $2 $3 $s >> runs/$1.log 2>&1
  fi
}
run g11 1 1 & run g41 4 1 & run g44 4 4 &
wait
echo "distill secs=$(( $(date +%s) - t0 ))"
for g in g11 g41 g44; do
  grep -v "Map:" runs/$g.log | grep -i "error\|Traceback" | head -n 3
  python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/$g/metrics.jsonl')]
print('$g', m[-1]['step'], 'first-200 loss', round(statistics.mean(r['loss'] for r in m[:200]),4), 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4), 'step_s', round(statistics.median(r['step_s'] for r in m[100:]),4))"
done
tar czf $OUT/gates.tgz -C runs g11/gates.safetensors g11/gate_config.json g41/gates.safetensors g41/gate_config.json g44/gates.safetensors g44/gate_config.json
left=$(( 585 - ($(date +%s) - t0) ))
for g in g11 g41 g44; do
  timeout $left seerjax eval --model runs/carry/base16 --gates runs/$g --methods seer --data embedded:heldout --seq-len 16384 \
    --densities 0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 2 --dense-last-rows 1 \
    --no-progress --out runs/e_$g > runs/e_$g.log 2>&1 &
done
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for g in g11 g41 g44; do cp runs/e_$g/results.json $OUT/eval_$g.json 2>/dev/null; echo $g; grep "^| seer\|^| dense" runs/e_$g.log || tail -n 4 runs/e_$g.log; done
