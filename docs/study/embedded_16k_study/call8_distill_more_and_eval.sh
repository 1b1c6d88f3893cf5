#!/usr/bin/env bash
# Throwaway: the 20k-step query-head gates distilled further at 16k (warm start, lr 5e-4), then seer evaluated alone.
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed" | tee -a $OUT/install.log
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus
t0=$(date +%s)
d() {  # steps
  seerjax distill --model runs/carry/base16 --data embedded:train --seq-len 16384 --steps $1 --out runs/g16/gq --gate-heads query \
    --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 5e-4 --skip-fraction 0 --warmup 500 \
    --save-every 3000 --retrieval-docs 4000 --seed 1 --init-gates runs/carry/gq20k --no-progress
}
timeout 390 bash -c "$(declare -f d); d 24000" > $OUT/distill.log 2>&1
rc=$?
echo "distill rc=$rc secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/distill.log
if [[ ! -f runs/g16/gq/gates.safetensors ]]; then
  s=$(ls runs/g16/gq/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1)
  echo "export at $s" | tee -a $OUT/distill.log
  d $s >> $OUT/distill.log 2>&1
fi
cp runs/g16/gq/metrics.jsonl $OUT/distill_metrics.jsonl
tar czf $OUT/gq.tgz -C runs/g16/gq gates.safetensors gate_config.json
timeout $(( 590 - ($(date +%s) - t0) )) seerjax eval --model runs/carry/base16 --gates runs/g16/gq --methods seer \
  --data embedded:heldout --seq-len 16384 --densities 0.5,0.25,0.1 --num-sequences 8 \
  --retrieval-lengths 4096,8192,16384 --retrieval-samples 4 --no-progress --out runs/g16/eval_gq > $OUT/eval.log 2>&1
echo "eval rc=$? total secs=$(( $(date +%s) - t0 ))" | tee -a $OUT/eval.log
cp runs/g16/eval_gq/results.json $OUT/results.json 2>/dev/null
grep "^|" $OUT/eval.log; tail -n 1 $OUT/distill_metrics.jsonl
