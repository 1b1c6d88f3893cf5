#!/usr/bin/env bash
# Throwaway: the 16k study grid (seer with the 44k-step query-head gates, oracle, the four baselines) with
# --dense-last-rows 1, and seer with the 18k-step KV-head gates likewise (the last query block attends densely, inside the same budget); methods two by two.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed" | tee -a $OUT/install.log
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs  # base16, the 44k query-head gates, the 18k KV-head gates
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # (missing in the call as run: quest,moba ran out of memory)
t0=$(date +%s)
common=(--model runs/carry/base16 --gates runs/g16/gq44k --data embedded:heldout --seq-len 16384 --densities 0.5,0.25,0.1
        --num-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress --dense-last-rows 1)
i=0
for m in seer,oracle streaming,vertical_slash quest,moba; do
  timeout 560 seerjax eval "${common[@]}" --methods $m --out runs/e1/part$i > $OUT/part$i.log 2>&1 &
  i=$((i + 1))
done
timeout 560 seerjax eval "${common[@]/gq44k/gates_kv}" --methods seer --out runs/e1/kv > $OUT/kv.log 2>&1 &
wait
echo "eval total secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/part0.log
python3 -m seerjax.eval.harness merge runs/e1/all runs/e1/part0 runs/e1/part1 runs/e1/part2 > runs/e1/merge.log 2>&1 || tail -5 runs/e1/merge.log
cp runs/e1/all/results.json $OUT/results.json 2>/dev/null
cat runs/e1/all/results.md 2>/dev/null | tee $OUT/results.md
cp runs/e1/kv/results.json $OUT/results_kv.json 2>/dev/null; grep '^|' $OUT/kv.log
tail -n 3 $OUT/part*.log
