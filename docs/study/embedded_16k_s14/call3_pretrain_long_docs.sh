#!/usr/bin/env bash
# Throwaway: the 16k curriculum with the main stage's synthetic documents at half to all of 16,384 bytes
# (--retrieval-min-fraction 0.5, 7,000 of them: more needles far from their question), steps trimmed to fit
# 8 minutes (2,650 x 8 at 8k, 1,450 x 4 at 16k); then dense retrieval by depth, 12 passkeys per length and
# depth, of the new model and of the study's model (base16).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs carry/base16
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
log=$OUT/pretrain.log
t0=$(date +%s)
timeout 275 seerjax pretrain --out runs/c3/s8 --preset small --seq-len 8192 --steps 2650 --batch 8 --lr 2e-3 \
  --retrieval-docs 12000 --save-every 700 --no-progress > $log 2>&1
echo "stage8 rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $log
t1=$(date +%s)
timeout 240 seerjax pretrain --out runs/c3/s16 --preset small --seq-len 16384 --steps 1450 --batch 4 --lr 1e-3 \
  --retrieval-docs 7000 --retrieval-min-fraction 0.5 --save-every 500 --init-model runs/c3/s8/model --no-progress >> $log 2>&1
echo "stage16 rc=$? secs=$(( $(date +%s) - t1 )) total=$(( $(date +%s) - t0 ))" | tee -a $log
cat runs/c3/s8/metrics.jsonl runs/c3/s16/metrics.jsonl > $OUT/metrics.jsonl
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two evaluations share the GPU
left=$(( 585 - ($(date +%s) - t0) ))
ev() { timeout $left seerjax eval --model $1 --methods dense --data embedded:heldout --seq-len 16384 --num-sequences 1 \
  --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 --no-progress --out $2; }
ev runs/c3/s16/model runs/c3/eval_new > runs/c3/eval_new.log 2>&1 &
ev runs/carry/base16 runs/c3/eval_old > runs/c3/eval_old.log 2>&1 &
seerjax convert --model runs/c3/s16/model --out runs/c3/bf16 --dtype bfloat16 > /dev/null 2>&1
tar cf - -C runs/c3 bf16 | split -b 14000000 - $OUT/bf16.tar.part.
wait
echo "evals done total=$(( $(date +%s) - t0 ))"
for x in new old; do
  cp runs/c3/eval_$x/results.json $OUT/eval_$x.json 2>/dev/null || tail -n 5 runs/c3/eval_$x.log
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; print(sys.argv[2], r['ppl'], r['retrieval'], r['retrieval_by_length_depth'])" $OUT/eval_$x.json $x
done
grep -v "Map:" $log | grep -i "pretrained\|rc=\|error" | tail -n 6
