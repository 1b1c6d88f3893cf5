#!/usr/bin/env bash
# Throwaway: (1) which of the sixteenth session's two changes to the 16k stage lowered the recall ceiling: the oracle
# at 0.1 (dense last row) on 8 held-out sequences, recall on all 8, for the call-1 model of that session (llama3:2
# RoPE scaling alone, passkey documents at their old lengths); (2) beside it, every `gpu`-marked test
# (eval/gpu_round.sh's tests step, ten pytest processes).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
[[ -d runs/carry/base_call1 ]] || tar xJf runs/carry/base_call1.txz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
timeout 400 seerjax eval --model runs/carry/base_call1 --data embedded:heldout --seq-len 16384 --num-sequences 8 \
  --recall-sequences 8 --retrieval-lengths 4096 --retrieval-samples 1 --no-progress --dense-last-rows 1 \
  --methods oracle --densities 0.1 --out runs/r2/call1 > runs/r2_call1.log 2>&1 &
CAP_TESTS=300 bash eval/gpu_round.sh $OUT tests
wait
echo "total secs=$(( $(date +%s) - t0 ))"
cp runs/r2/call1/results.json $OUT/call2_ceiling_call1.json 2>/dev/null; grep '^|' runs/r2_call1.log || tail -n 6 runs/r2_call1.log
grep -E "passed|failed|error|rc=" $OUT/tests.log | head -40
nvidia-smi --query-gpu=name --format=csv,noheader
