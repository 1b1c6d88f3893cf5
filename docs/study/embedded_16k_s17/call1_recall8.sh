#!/usr/bin/env bash
# Throwaway: the sixteenth session's study model (call 4) and gates, attention-mass recall at 0.1 on all 8 held-out
# sequences (was the first only), with the dense last row: seer with the query-head gates (call 5), seer with the
# KV-head gates after 20k steps (call 7), the oracle, and oracle_kv (one mask per KV head) at 0.5 / 0.25 / 0.1.
# Three processes side by side; 3 passkeys each (4k), the retrieval figures are not the point here.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
[[ -d runs/carry/base_call4 ]] || tar xJf runs/carry/base.txz -C runs/carry
[[ -f runs/c5/gates_kv/gates.safetensors ]] || { mkdir -p runs/c5 && tar xzf runs/carry/gates.tgz -C runs/c5; }
[[ -f runs/c7/kv_more/gates.safetensors ]] || { mkdir -p runs/c7 && tar xzf runs/carry/kv_more.tgz -C runs/c7; }
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
common=(--model runs/carry/base_call4 --data embedded:heldout --seq-len 16384 --num-sequences 8 --recall-sequences 8
        --retrieval-lengths 4096 --retrieval-samples 1 --no-progress --dense-last-rows 1)
timeout 500 seerjax eval "${common[@]}" --gates runs/c5/gates_query --methods seer --densities 0.1 --out runs/r1/q > runs/r1_q.log 2>&1 &
timeout 500 seerjax eval "${common[@]}" --gates runs/c7/kv_more --methods seer --densities 0.1 --out runs/r1/kv > runs/r1_kv.log 2>&1 &
timeout 500 seerjax eval "${common[@]}" --gates runs/c5/gates_query --methods oracle,oracle_kv --densities 0.5,0.25,0.1 \
  --out runs/r1/oracle > runs/r1_oracle.log 2>&1 &
wait
echo "total secs=$(( $(date +%s) - t0 ))"
for x in q kv oracle; do cp runs/r1/$x/results.json $OUT/call1_$x.json 2>/dev/null; grep '^|' runs/r1_$x.log || tail -n 6 runs/r1_$x.log; done
for f in runs/r1_*.log; do grep -v "Map:" $f | grep -i "error\|Traceback" | head -n 2; done
nvidia-smi --query-gpu=name --format=csv,noheader
