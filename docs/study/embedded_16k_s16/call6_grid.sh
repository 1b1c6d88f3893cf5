#!/usr/bin/env bash
# Throwaway: the study grid on the call-4 base model with the call-5 gates, the dense last row (study.sh's default
# SELECT): seer with query-head gates and the oracle, streaming and vertical-slash, Quest and MoBA, seer with
# KV-head gates; 8 held-out sequences of 16,384 bytes at 0.5 / 0.25 / 0.1, 36 passkeys; four processes side by side.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
[[ -d runs/carry/base_call4 ]] || tar xJf runs/carry/base.txz -C runs/carry
[[ -f runs/c5/gates_kv/gates.safetensors ]] || { mkdir -p runs/c5 && tar xzf runs/carry/gates.tgz -C runs/c5; }  # a fresh machine
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
common=(--model runs/carry/base_call4 --data embedded:heldout --seq-len 16384 --densities 0.5,0.25,0.1
        --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress --dense-last-rows 1)
i=0
for m in seer,oracle streaming,vertical_slash quest,moba; do
  timeout 560 seerjax eval "${common[@]}" --gates runs/c5/gates_query --methods $m --out runs/e6/part$i > runs/e6_part$i.log 2>&1 &
  i=$((i + 1))
done
timeout 560 seerjax eval "${common[@]}" --gates runs/c5/gates_kv --methods seer --out runs/e6/kv > runs/e6_kv.log 2>&1 &
wait
echo "eval total secs=$(( $(date +%s) - t0 ))"
python3 -m seerjax.eval.harness merge runs/e6/all runs/e6/part0 runs/e6/part1 runs/e6/part2 > runs/e6_merge.log 2>&1 || tail -5 runs/e6_merge.log
cp runs/e6/all/results.json $OUT/grid_query.json 2>/dev/null
cat runs/e6/all/results.md 2>/dev/null
cp runs/e6/kv/results.json $OUT/grid_kv.json 2>/dev/null; grep '^|' runs/e6_kv.log
for f in runs/e6_*.log; do grep -v "Map:" $f | grep -i "error\|Traceback" | head -n 2; done
