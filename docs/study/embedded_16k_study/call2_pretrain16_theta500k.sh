#!/usr/bin/env bash
# Throwaway: 16k base model with rope theta 500000, then dense retrieval at 4k/8k/16k; bf16 copy back in 2 parts.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed" | tee -a $OUT/install.log
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/device.txt
t0=$(date +%s)
timeout 470 seerjax pretrain --out runs/t16/base --preset small --seq-len 16384 --steps 3400 --batch 4 --lr 2e-3 \
  --rope-theta 500000 --retrieval-docs 12000 --save-every 400 --no-progress > $OUT/pretrain.log 2>&1
echo "pretrain rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/pretrain.log
cp runs/t16/base/metrics.jsonl $OUT/pretrain_metrics.jsonl
seerjax convert --model runs/t16/base/model --out runs/t16/bf16 --dtype bfloat16 > /dev/null 2>&1
timeout $(( 585 - ($(date +%s) - t0) )) seerjax eval --model runs/t16/bf16 --data embedded:heldout --seq-len 16384 \
  --densities 0.1 --methods oracle --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 \
  --no-progress --out runs/t16/eval > $OUT/eval.log 2>&1
echo "eval rc=$? total secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/eval.log
cp runs/t16/eval/results.json $OUT/results.json 2>/dev/null
tar cf - -C runs/t16 bf16 | split -b 30000000 - $OUT/bf16.tar.part.
grep -v "Map:" $OUT/pretrain.log | tail -2; grep "^|" $OUT/eval.log
