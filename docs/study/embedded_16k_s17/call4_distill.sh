#!/usr/bin/env bash
# Throwaway: query-head and KV-head gates for the call-3 base model of this session (base_c3: the 16k recipe with 2,400 + 1,850 steps,
# llama3:2, passkey documents at full length), side by side, each a whole 12,000-step schedule at 8x8 sub-blocks
# (eval/study.sh's distill settings with DISTILL_STEPS=12000 and --skip-fraction 0), the latest checkpoint exported
# if the time limit cuts one short. Beside them, the `gpu` tests the second call's cap cut short (the Hopper
# backward's case4 and the dispatch entry).
set -u
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed"
python3 -m pip install -q --no-deps --no-index runs/carry/whl/*.whl
tar xzf runs/carry/corpus.tgz -C runs/carry
tar xJf runs/carry/base_c3.txz -C runs/carry
export SEERJAX_CORPUS=$PWD/runs/carry/corpus XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
( timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hopper_bwd.py -k case4 > runs/t_bwd.log 2>&1; echo rc=$? >> runs/t_bwd.log ) &
( timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hopper.py -k dispatch > runs/t_dispatch.log 2>&1; echo rc=$? >> runs/t_dispatch.log ) &
d() {  # heads steps
  seerjax distill --model runs/carry/base_c3 --data embedded:train --seq-len 16384 --steps $2 --out runs/c4/gates_$1 \
    --gate-heads $1 --block-size 64 --d-gate 128 --gate-type Qavgmax_Kmaxminavg --lr 1e-3 --skip-fraction 0 \
    --warmup 1201 --q-sub-blocks 8 --k-sub-blocks 8 --save-every 2000 --retrieval-docs 4000 --no-progress
}
for h in query kv; do
  ( timeout 520 bash -c "$(declare -f d); d $h 12000" > runs/c4_$h.log 2>&1
    if [[ ! -f runs/c4/gates_$h/gates.safetensors ]]; then
      s=$(ls runs/c4/gates_$h/checkpoints | grep -E '^[0-9]+$' | sort -n | tail -1); echo "$h: export at $s"
      d $h $s >> runs/c4_$h.log 2>&1
    fi ) &
done
wait
echo "distill secs=$(( $(date +%s) - t0 ))"
for h in query kv; do
  grep -v "Map:" runs/c4_$h.log | grep -i "error\|Traceback" | head -n 3
  python3 -c "
import json,statistics; m=[json.loads(l) for l in open('runs/c4/gates_$h/metrics.jsonl')]
print('$h', m[-1]['step'], 'last-1000 loss', round(statistics.mean(r['loss'] for r in m[-1000:]),4), 'step_s', round(statistics.median(r['step_s'] for r in m[100:]),4))
open('$OUT/${h}_metrics_every50.jsonl','w').write(''.join(json.dumps(r)+'\n' for r in m if r['step'] % 50 == 0))"
done
tar czf $OUT/gates.tgz -C runs/c4 gates_query/gates.safetensors gates_query/gate_config.json gates_kv/gates.safetensors gates_kv/gate_config.json
tail -n 2 runs/t_bwd.log runs/t_dispatch.log
echo "total secs=$(( $(date +%s) - t0 ))"
