#!/usr/bin/env bash
# Throwaway: call 1 (the 16k recipe, its 16k stage with --rope-scaling llama3:2) with the 16k stage's passkey
# documents all 16,384 bytes long (--passkey-min-fraction 1.0: needle distances spread evenly up to 16k); then
# dense retrieval, 12 passkeys per length and depth, and the new model in bf16 (split in 14 MB parts).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
SCALING=${SCALING:-llama3:2}
PASSKEY=${PASSKEY:-1.0}
log=$OUT/pretrain.log
t0=$(date +%s)
if [[ ! -f runs/c4/s8/model/config.json ]]; then  # a warm machine keeps the first stage of an earlier call
  rm -rf runs/c4/s8
  timeout 280 seerjax pretrain --out runs/c4/s8 --preset small --seq-len 8192 --steps 2800 --batch 8 --lr 2e-3 \
    --retrieval-docs 12000 --save-every 700 --no-progress > $log 2>&1
  echo "stage8 rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $log
fi
t1=$(date +%s)
rm -rf runs/c4/s16
timeout 250 seerjax pretrain --out runs/c4/s16 --preset small --seq-len 16384 --steps 1500 --batch 4 --lr 1e-3 \
  --retrieval-docs 12000 --save-every 500 --init-model runs/c4/s8/model --rope-scaling $SCALING --passkey-min-fraction $PASSKEY --no-progress >> $log 2>&1
echo "stage16 ($SCALING, passkey $PASSKEY) rc=$? secs=$(( $(date +%s) - t1 )) total=$(( $(date +%s) - t0 ))" | tee -a $log
cat runs/c4/s8/metrics.jsonl runs/c4/s16/metrics.jsonl > $OUT/metrics.jsonl
left=$(( 585 - ($(date +%s) - t0) ))
timeout $left seerjax eval --model runs/c4/s16/model --methods dense --data embedded:heldout --seq-len 16384 \
  --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 --no-progress --out runs/c4/eval \
  > runs/c4/eval.log 2>&1 &
seerjax convert --model runs/c4/s16/model --out runs/c4/bf16 --dtype bfloat16 > /dev/null 2>&1
tar cf - -C runs/c4 bf16 | split -b 14000000 - $OUT/bf16.tar.part.
wait
echo "eval done total=$(( $(date +%s) - t0 ))"
cp runs/c4/eval/results.json $OUT/eval.json 2>/dev/null || tail -n 5 runs/c4/eval.log
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; print(r['ppl'], r['retrieval'], r['retrieval_by_length_depth'])" $OUT/eval.json
grep -v "Map:" $log | grep -i "pretrained\|rc=\|error" | tail -n 6
