#!/usr/bin/env bash
# Throwaway: what call 1 lost (quest,moba ran out of memory; the KV-head seer run too), with --dense-last-rows 1,
# and the retrieval of dense / seer / oracle at 0.1 on 12 samples per length and depth (108 documents).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed" | tee -a $OUT/install.log
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs  # base16, the 44k query-head gates, the 18k KV-head gates
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the processes share the GPU
t0=$(date +%s)
common=(--model runs/carry/base16 --data embedded:heldout --seq-len 16384 --retrieval-lengths 4096,8192,16384
        --no-progress --dense-last-rows 1)
timeout 560 seerjax eval "${common[@]}" --gates runs/g16/gq44k --methods quest,moba --densities 0.5,0.25,0.1 \
  --num-sequences 8 --retrieval-samples 4 --out runs/e2/a > $OUT/a.log 2>&1 &
timeout 560 seerjax eval "${common[@]}" --gates runs/g16/gates_kv --methods seer --densities 0.5,0.25,0.1 \
  --num-sequences 8 --retrieval-samples 4 --out runs/e2/b > $OUT/b.log 2>&1 &
timeout 560 seerjax eval "${common[@]}" --gates runs/g16/gq44k --methods seer,oracle --densities 0.1 \
  --num-sequences 1 --retrieval-samples 12 --out runs/e2/c > $OUT/c.log 2>&1 &
wait
echo "eval total secs=$(( $(date +%s) - t0 ))"
for x in a b c; do cp runs/e2/$x/results.json $OUT/$x.json 2>/dev/null; grep '^|' $OUT/$x.log || tail -n 4 $OUT/$x.log; done
