#!/usr/bin/env bash
# Throwaway: call 4's from-scratch 8×8 query-head gates (s88) at 0.1 on 108 passkeys (12 per length and depth),
# with and without the dense last row, side by side.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
r108=(--model runs/carry/base16 --gates runs/s15/s88 --methods seer --data embedded:heldout --seq-len 16384 --densities 0.1
      --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 --no-progress)
timeout 400 seerjax eval "${r108[@]}" --out runs/r_norow > runs/r_norow.log 2>&1 &
timeout 400 seerjax eval "${r108[@]}" --dense-last-rows 1 --out runs/r_row > runs/r_row.log 2>&1 &
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for x in r_norow r_row; do cp runs/$x/results.json $OUT/$x.json 2>/dev/null; echo $x; grep "^| seer\|^| dense" runs/$x.log || tail -n 4 runs/$x.log; done
