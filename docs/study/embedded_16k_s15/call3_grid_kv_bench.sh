#!/usr/bin/env bash
# Throwaway: (1) the grid for call 2's 8×8 sub-block query-head gates (g88): seer at 0.5 / 0.25 / 0.1 with and without
# the dense last row (8 sequences, 36 passkeys), side by side with (2) the 18k-step KV-head gates warm-started at
# 8×8 for 6,000 steps (lr 3e-4), then evaluated the same way with the dense row; (3) alone at the end, the gate's
# time per layer at whole-block, 4×4 and 8×8 grains (Llama-3.1-8B shapes, eval/bench_gate.py).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16 g16/gates_kv/gates.safetensors g16/gates_kv/gate_config.json
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
common=(--model runs/carry/base16 --methods seer --data embedded:heldout --seq-len 16384 --densities 0.5,0.25,0.1
        --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress)
timeout 420 seerjax eval "${common[@]}" --gates runs/s15/g88 --dense-last-rows 1 --out runs/e88_row > runs/e88_row.log 2>&1 &
timeout 420 seerjax eval "${common[@]}" --gates runs/s15/g88 --out runs/e88_norow > runs/e88_norow.log 2>&1 &
kv() {  # steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $1 --out runs/kv88 --gate-heads kv \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 3e-4 --skip-fraction 0 --warmup 601 \
    --q-sub-blocks 8 --k-sub-blocks 8 --init-gates runs/g16/gates_kv --save-every 1000 --retrieval-docs 4000 --no-progress
}
(
  timeout 260 bash -c "$(declare -f kv); kv 6000" > runs/kv88.log 2>&1
  if [[ ! -f runs/kv88/gates.safetensors ]]; then
    s=$(ls runs/kv88/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "kv88: export at $s"; kv $s >> runs/kv88.log 2>&1
  fi
  echo "kv distill secs=$(( $(date +%s) - t0 ))"
  python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/kv88/metrics.jsonl')]
print('kv88', m[-1]['step'], 'first-200 loss', round(statistics.mean(r['loss'] for r in m[:200]),4), 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4), 'step_s', round(statistics.median(r['step_s'] for r in m[100:]),4))"
  tar czf $OUT/kv88.tgz -C runs kv88/gates.safetensors kv88/gate_config.json
  timeout $(( 470 - ($(date +%s) - t0) )) seerjax eval "${common[@]}" --gates runs/kv88 --dense-last-rows 1 --out runs/ekv > runs/ekv.log 2>&1
) &
wait
echo "evals secs=$(( $(date +%s) - t0 ))"
for x in e88_row e88_norow ekv; do cp runs/$x/results.json $OUT/$x.json 2>/dev/null; echo $x; grep "^| seer\|^| dense" runs/$x.log || tail -n 4 runs/$x.log; done
unset XLA_PYTHON_CLIENT_PREALLOCATE
timeout $(( 590 - ($(date +%s) - t0) )) python3 eval/bench_gate.py --lengths 32768,131072 --reps 20 --grains 4x4,8x8 --json $OUT/bench_gate.json > runs/bench.log 2>&1
grep "^|" runs/bench.log || tail -n 5 runs/bench.log
echo "total secs=$(( $(date +%s) - t0 ))"
