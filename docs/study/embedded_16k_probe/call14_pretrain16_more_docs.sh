#!/usr/bin/env bash
# Throwaway: the 16k probe with 2.5x the synthetic retrieval documents (30,000), exported in bf16.
set -u
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
start=$(date +%s)
SEQ=16384 PRETRAIN_STEPS=3400 PRETRAIN_BATCH=4 RETRIEVAL_DOCS=30000 timeout 520 bash eval/study.sh pretrain runs/s16 > $OUT/pretrain16r.log 2>&1
echo "pretrain rc=$? secs=$(( $(date +%s) - start ))" >> $OUT/pretrain16r.log
seerjax convert --model runs/s16/base/model --out runs/s16/bf16 --dtype bfloat16 >> $OUT/pretrain16r.log 2>&1

cp runs/s16/base/metrics.jsonl $OUT/pretrain16r_metrics.jsonl
tail -5 $OUT/pretrain16r.log; ls -la $OUT
