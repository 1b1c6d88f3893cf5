#!/usr/bin/env bash
# Throwaway: a base model pretrained at 16k bytes (the 8k study's recipe with half the batch), exported in bf16.
set -u
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
start=$(date +%s)
SEQ=16384 PRETRAIN_STEPS=3400 PRETRAIN_BATCH=4 timeout 520 bash eval/study.sh pretrain runs/s16 > $OUT/pretrain16.log 2>&1
echo "pretrain rc=$? secs=$(( $(date +%s) - start ))" >> $OUT/pretrain16.log
seerjax convert --model runs/s16/base/model --out runs/s16/bf16 --dtype bfloat16 >> $OUT/pretrain16.log 2>&1
tar cf $OUT/base16.tar -C runs/s16 bf16
cp runs/s16/base/metrics.jsonl $OUT/pretrain16_metrics.jsonl
tail -5 $OUT/pretrain16.log; ls -la $OUT
