#!/usr/bin/env bash
# Throwaway: a 16k base model by curriculum (8k, then 16k from it), then dense retrieval and the oracle at 16k.
set -u
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
timeout 230 seerjax pretrain --out runs/c16/s8 --preset small --seq-len 8192 --steps 1500 --batch 8 --lr 2e-3 \
  --retrieval-docs 12000 --save-every 500 --no-progress > $OUT/c16_stage8.log 2>&1
echo "stage8 rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/c16_stage8.log
t1=$(date +%s)
timeout 290 seerjax pretrain --out runs/c16/s16 --preset small --seq-len 16384 --steps 1700 --batch 4 --lr 1e-3 \
  --retrieval-docs 12000 --save-every 500 --init-model runs/c16/s8/model --no-progress > $OUT/c16_stage16.log 2>&1
echo "stage16 rc=$? secs=$(( $(date +%s) - t1 ))" | tee -a $OUT/c16_stage16.log
timeout $(( 590 - ($(date +%s) - t0) )) seerjax eval --model runs/c16/s16/model --data embedded:heldout --seq-len 16384 \
  --densities 0.1 --methods oracle --num-sequences 2 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 \
  --no-progress --out runs/c16/eval > $OUT/c16_eval.log 2>&1
echo "eval rc=$? total secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/c16_eval.log
cp runs/c16/eval/results.json $OUT/c16_results.json 2>/dev/null
cp runs/c16/s8/metrics.jsonl $OUT/c16_stage8_metrics.jsonl; cp runs/c16/s16/metrics.jsonl $OUT/c16_stage16_metrics.jsonl
grep -v "Map:" $OUT/c16_stage8.log | tail -2; grep -v "Map:" $OUT/c16_stage16.log | tail -2; grep "^|" $OUT/c16_eval.log
