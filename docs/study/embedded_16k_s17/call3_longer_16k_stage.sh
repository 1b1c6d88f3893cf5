#!/usr/bin/env bash
# Throwaway: the sixteenth session's 16k recipe (llama3:2 RoPE scaling, passkey documents at full length) with
# 400 steps moved from the 8k stage to the 16k stage's share of time (8k: S1 steps, 16k: S2 steps; defaults
# 2400 and 1850, about the same 8 minutes); then dense retrieval on 108 passkeys (12 per length and depth), and
# beside it the oracle at 0.1 with the dense last row on 8 held-out sequences, recall on all 8 (the recall
# ceiling); the model in bf16 (14 MB parts).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
[[ -d runs/carry/corpus ]] || tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
S1=${S1:-2400}
S2=${S2:-1850}
log=$OUT/pretrain.log
t0=$(date +%s)
rm -rf runs/c3
timeout 260 seerjax pretrain --out runs/c3/s8 --preset small --seq-len 8192 --steps $S1 --batch 8 --lr 2e-3 \
  --retrieval-docs 12000 --save-every 600 --no-progress > $log 2>&1
echo "stage8 rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $log
t1=$(date +%s)
timeout 280 seerjax pretrain --out runs/c3/s16 --preset small --seq-len 16384 --steps $S2 --batch 4 --lr 1e-3 \
  --retrieval-docs 12000 --save-every 500 --init-model runs/c3/s8/model --rope-scaling llama3:2 --passkey-min-fraction 1.0 \
  --no-progress >> $log 2>&1
echo "stage16 rc=$? secs=$(( $(date +%s) - t1 )) total=$(( $(date +%s) - t0 ))" | tee -a $log
python3 -c "
import json,sys
for f in sys.argv[1:]:
  m=[json.loads(l) for l in open(f)]; print(f, [r for r in m if r['step'] % 50 == 0][-1])
  open('$OUT/metrics_every50.jsonl','a').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))" runs/c3/s8/metrics.jsonl runs/c3/s16/metrics.jsonl
left=$(( 585 - ($(date +%s) - t0) ))
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout $left seerjax eval --model runs/c3/s16/model --methods dense --data embedded:heldout --seq-len 16384 \
  --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 --no-progress --out runs/c3/eval \
  > runs/c3/eval.log 2>&1 &
timeout $left seerjax eval --model runs/c3/s16/model --methods oracle --densities 0.1 --data embedded:heldout --seq-len 16384 \
  --num-sequences 8 --recall-sequences 8 --retrieval-lengths 4096 --retrieval-samples 1 --dense-last-rows 1 --no-progress \
  --out runs/c3/oracle > runs/c3/oracle.log 2>&1 &
seerjax convert --model runs/c3/s16/model --out runs/c3/bf16 --dtype bfloat16 > /dev/null 2>&1
tar cf - -C runs/c3 bf16 | split -b 14000000 - $OUT/bf16.tar.part.
wait
echo "eval done total=$(( $(date +%s) - t0 ))"
cp runs/c3/eval/results.json $OUT/eval.json 2>/dev/null || tail -n 5 runs/c3/eval.log
cp runs/c3/oracle/results.json $OUT/oracle.json 2>/dev/null || tail -n 5 runs/c3/oracle.log
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; print(r['ppl'], r['retrieval'], r['retrieval_by_length_depth'])" $OUT/eval.json
grep '^|' runs/c3/oracle.log
grep -v "Map:" $log | grep -i "pretrained\|rc=\|error" | tail -n 6
