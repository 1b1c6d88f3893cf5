#!/usr/bin/env bash
# Throwaway: (1) call 4's from-scratch 8×8 query-head gates (12,000 steps; the run was stopped there, its
# 16,000-step cosine schedule unfinished) at 0.5 / 0.25 / 0.1, with and without the dense last row, side by side;
# (2) alone, prefill time to first token of a 4-layer Llama-3.1-8B-shaped model at 131,072 tokens, density 0.1,
# whole-block gates against 8×8 sub-block gates (eval/bench_prefill.py).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
common=(--model runs/carry/base16 --gates runs/s15/s88 --methods seer --data embedded:heldout --seq-len 16384
        --densities 0.5,0.25,0.1 --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress)
timeout 330 seerjax eval "${common[@]}" --dense-last-rows 1 --out runs/row > runs/row.log 2>&1 &
timeout 330 seerjax eval "${common[@]}" --out runs/norow > runs/norow.log 2>&1 &
wait
echo "evals secs=$(( $(date +%s) - t0 ))"
for x in row norow; do cp runs/$x/results.json $OUT/s88_$x.json 2>/dev/null; echo $x; grep "^| seer\|^| dense" runs/$x.log || tail -n 4 runs/$x.log; done
unset XLA_PYTHON_CLIENT_PREALLOCATE
for g in 1x1 8x8; do
  left=$(( 590 - ($(date +%s) - t0) )); [[ $left -lt 30 ]] && break
  timeout $left python3 eval/bench_prefill.py --layers 4 --lengths 131072 --densities 0.1 --reps 3 --grain $g \
    --json $OUT/prefill_$g.json > runs/prefill_$g.log 2>&1
  echo "prefill $g rc=$?"; grep "^|" runs/prefill_$g.log || tail -n 5 runs/prefill_$g.log
done
echo "total secs=$(( $(date +%s) - t0 ))"
