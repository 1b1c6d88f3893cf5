#!/usr/bin/env bash
# Throwaway: the study's base-model recipe again (8k 2,800 x 8 at 2e-3, then 16k 1,500 x 4 at 1e-3, 12,000 synthetic
# documents), timed with this session's code (the pretrain loop reads each loss one step late since commit 1683655);
# then dense retrieval by depth of this replicate, and seer (44k query-head gates) at 0.1 without the dense last
# row on the 108 passkeys of call 2.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/bundle/bg.txz -C runs
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
log=$OUT/pretrain.log
t0=$(date +%s)
STAGE1=8192:2800:8:2e-3 SEQ=16384 PRETRAIN_STEPS=1500 PRETRAIN_BATCH=4 PRETRAIN_LR=1e-3 RETRIEVAL_DOCS=12000 \
  timeout 530 bash eval/study.sh pretrain runs/c4 > $log 2>&1
echo "recipe rc=$? secs=$(( $(date +%s) - t0 ))" | tee -a $log
cat runs/c4/base_stage1/metrics.jsonl runs/c4/base/metrics.jsonl > $OUT/metrics.jsonl
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two evaluations share the GPU
left=$(( 590 - ($(date +%s) - t0) ))
common=(--data embedded:heldout --seq-len 16384 --num-sequences 1 --retrieval-lengths 4096,8192,16384 --retrieval-samples 12 --no-progress)
timeout $left seerjax eval --model runs/c4/base/model --methods dense "${common[@]}" --out runs/c4/eval_dense > runs/c4/eval_dense.log 2>&1 &
timeout $left seerjax eval --model runs/carry/base16 --gates runs/g16/gq44k --methods seer --densities 0.1 "${common[@]}" \
  --out runs/c4/eval_seer > runs/c4/eval_seer.log 2>&1 &
wait
echo "evals done total=$(( $(date +%s) - t0 ))"
for x in dense seer; do
  cp runs/c4/eval_$x/results.json $OUT/eval_$x.json 2>/dev/null || tail -n 5 runs/c4/eval_$x.log
  python3 -c "import json,sys; [print(sys.argv[2], r['method'], r['ppl'], r['retrieval'], r['retrieval_by_length_depth']) for r in json.load(open(sys.argv[1]))]" $OUT/eval_$x.json $x
done
grep -v "Map:" $log | grep -i "pretrained\|rc=\|error\|==" | tail -n 8
