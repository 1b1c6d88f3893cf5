#!/usr/bin/env bash
# Throwaway: (1) the GPU tests of the sub-block scoring kernel and the gate; (2) the gate's time per layer at
# whole-block, 4×4 and 8×8 grains, now through the kernel (Llama-3.1-8B shapes, eval/bench_gate.py); then side by
# side (3) query-head gates at 8×8 distilled from scratch (lr 1e-3, 16,000 steps, the grain's own recipe, no
# warm start) and (4) retrieval on 108 passkeys (12 per length and depth) of call 2's 8×8 gates at 0.1, with and
# without the dense last row; (5) the from-scratch gates evaluated at 0.5 / 0.25 / 0.1 with the dense row.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
timeout 150 python3 -m pytest -q -x -m gpu tests/test_sub_block_scores.py tests/test_gate.py > runs/gpu_tests.log 2>&1
rc=$?; tail -n 30 runs/gpu_tests.log; cp runs/gpu_tests.log $OUT/
if [[ $rc != 0 ]]; then echo "GPU tests failed (rc=$rc): stopping"; exit 1; fi
timeout 150 python3 eval/bench_gate.py --lengths 32768,131072 --reps 20 --grains 4x4,8x8 --json $OUT/bench_gate.json > runs/bench.log 2>&1
echo "bench rc=$?"; cp runs/bench.log $OUT/; grep "^|" runs/bench.log | grep -v "pool\|k-th\|premasked\|compact"; tail -n 3 runs/bench.log
echo "tests+bench secs=$(( $(date +%s) - t0 ))"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
d() {  # steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $1 --out runs/s88 --gate-heads query \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 1e-3 --skip-fraction 0 --warmup 1601 \
    --q-sub-blocks 8 --k-sub-blocks 8 --save-every 2000 --retrieval-docs 4000 --no-progress
}
(
  timeout 280 bash -c "$(declare -f d); d 16000" > runs/s88.log 2>&1
  if [[ ! -f runs/s88/gates.safetensors ]]; then
    s=$(ls runs/s88/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "s88: export at $s"; d $s >> runs/s88.log 2>&1
  fi
  echo "distill secs=$(( $(date +%s) - t0 ))"
  grep -v "Map:" runs/s88.log | grep -i "error\|Traceback" | head -n 3
  python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/s88/metrics.jsonl')]
print('s88', m[-1]['step'], 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4), 'step_s', round(statistics.median(r['step_s'] for r in m[100:]),4))
open('$OUT/s88_metrics_every50.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
  tar czf $OUT/s88.tgz -C runs s88/gates.safetensors s88/gate_config.json
  timeout $(( 585 - ($(date +%s) - t0) )) seerjax eval --model runs/carry/base16 --gates runs/s88 --methods seer --data embedded:heldout \
    --seq-len 16384 --densities 0.5,0.25,0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 \
    --dense-last-rows 1 --no-progress --out runs/es88 > runs/es88.log 2>&1
) &
r108=(--model runs/carry/base16 --gates runs/s15/g88 --methods seer --data embedded:heldout --seq-len 16384 --densities 0.1
      --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 --no-progress)
timeout 400 seerjax eval "${r108[@]}" --out runs/r_norow > runs/r_norow.log 2>&1 &
timeout 400 seerjax eval "${r108[@]}" --dense-last-rows 1 --out runs/r_row > runs/r_row.log 2>&1 &
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for x in r_norow r_row es88; do cp runs/$x/results.json $OUT/$x.json 2>/dev/null; echo $x; grep "^| seer\|^| dense" runs/$x.log || tail -n 4 runs/$x.log; done
