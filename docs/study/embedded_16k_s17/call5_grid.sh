#!/usr/bin/env bash
# Throwaway: the study grid on this session's call-3 base model with the call-4 gates, the dense last row
# (study.sh's default SELECT): seer with query-head gates, the oracle, streaming and vertical-slash, Quest and MoBA,
# seer with KV-head gates, oracle_kv; 8 held-out sequences of 16,384 bytes at 0.5 / 0.25 / 0.1, recall on all 8,
# 36 passkeys; six processes side by side.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
[[ -d runs/carry/base_c3 ]] || tar xJf runs/carry/base_c3.txz -C runs/carry
[[ -f runs/c4/gates_kv/gates.safetensors ]] || { mkdir -p runs/c4 && tar xzf runs/carry/gates_c4.tgz -C runs/c4; }
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
common=(--model runs/carry/base_c3 --data embedded:heldout --seq-len 16384 --densities 0.5,0.25,0.1 --num-sequences 8
        --recall-sequences 8 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress --dense-last-rows 1)
i=0
for m in seer oracle streaming,vertical_slash quest,moba; do
  timeout 550 seerjax eval "${common[@]}" --gates runs/c4/gates_query --methods $m --out runs/e5/part$i > runs/e5_part$i.log 2>&1 &
  i=$((i + 1))
done
timeout 550 seerjax eval "${common[@]}" --gates runs/c4/gates_kv --methods seer --out runs/e5/kv > runs/e5_kv.log 2>&1 &
timeout 550 seerjax eval "${common[@]}" --gates runs/c4/gates_kv --methods oracle_kv --out runs/e5/okv > runs/e5_okv.log 2>&1 &
wait
echo "eval total secs=$(( $(date +%s) - t0 ))"
python3 -m seerjax.eval.harness merge runs/e5/all runs/e5/part0 runs/e5/part1 runs/e5/part2 runs/e5/part3 runs/e5/okv \
  > runs/e5_merge.log 2>&1 || tail -5 runs/e5_merge.log
cp runs/e5/all/results.json $OUT/grid_query.json 2>/dev/null
cat runs/e5/all/results.md 2>/dev/null
cp runs/e5/kv/results.json $OUT/grid_kv.json 2>/dev/null; grep '^|' runs/e5_kv.log
for f in runs/e5_*.log; do grep -v "Map:" $f | grep -i "error\|Traceback" | head -n 2; done
