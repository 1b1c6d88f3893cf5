#!/usr/bin/env bash
# Throwaway: 16k base model by a curriculum (8k 2800x8 at lr 2e-3, then 16k 1500x4 at 1e-3 from it), dense
# retrieval at 4k/8k/16k; the bf16 model back in 4 parts.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed" | tee -a $OUT/install.log
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
timeout 270 seerjax pretrain --out runs/c16/s8 --preset small --seq-len 8192 --steps 2800 --batch 8 --lr 2e-3 \
  --retrieval-docs 12000 --save-every 700 --no-progress > $OUT/stage8.log 2>&1
echo "stage8 rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/stage8.log
t1=$(date +%s)
timeout 230 seerjax pretrain --out runs/c16/s16 --preset small --seq-len 16384 --steps 1500 --batch 4 --lr 1e-3 \
  --retrieval-docs 12000 --save-every 500 --init-model runs/c16/s8/model --no-progress > $OUT/stage16.log 2>&1
echo "stage16 rc=$? secs=$(( $(date +%s) - t1 )) total=$(( $(date +%s) - t0 ))" | tee -a $OUT/stage16.log
cat runs/c16/s8/metrics.jsonl runs/c16/s16/metrics.jsonl > $OUT/metrics.jsonl
seerjax convert --model runs/c16/s16/model --out runs/c16/bf16 --dtype bfloat16 > /dev/null 2>&1
tar cf - -C runs/c16 bf16 | split -b 14000000 - $OUT/bf16.tar.part.
timeout $(( 590 - ($(date +%s) - t0) )) seerjax eval --model runs/c16/bf16 --data embedded:heldout --seq-len 16384 \
  --densities 0.1 --methods oracle --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 6 \
  --no-progress --out runs/c16/eval > $OUT/eval.log 2>&1
echo "eval rc=$? total secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/eval.log
cp runs/c16/eval/results.json $OUT/results.json 2>/dev/null
grep -v "Map:" $OUT/stage8.log | tail -1; grep -v "Map:" $OUT/stage16.log | tail -1; grep "^|" $OUT/eval.log
