#!/usr/bin/env bash
# Throwaway: 108 passkeys (12 per length and depth) at 0.1 with the dense last row for seer with the call-4
# query-head gates, on the call-3 base model; dense beside it (1 sequence for PPL).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
[[ -d runs/carry/base_c3 ]] || tar xJf runs/carry/base_c3.txz -C runs/carry
[[ -f runs/c4/gates_kv/gates.safetensors ]] || { mkdir -p runs/c4 && tar xzf runs/carry/gates_c4.tgz -C runs/c4; }
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
timeout 380 seerjax eval --model runs/carry/base_c3 --gates runs/c4/gates_query --methods seer --densities 0.1 \
  --data embedded:heldout --seq-len 16384 --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 \
  --dense-last-rows 1 --no-progress --out runs/e6/r108 > runs/e6_r108.log 2>&1
echo "total secs=$(( $(date +%s) - t0 ))"
cp runs/e6/r108/results.json $OUT/retrieval108.json 2>/dev/null; grep '^|' runs/e6_r108.log || tail -n 5 runs/e6_r108.log
