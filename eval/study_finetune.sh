#!/usr/bin/env bash
# The fine-tuning study (GPU): extend the embedded base model's context with YaRN, once with dense attention
# and once with SeerAttention at one density, then compare long-context perplexity and step time.
#
#   MODEL=runs/study/base/model GATES=runs/study/gates_query bash eval/study_finetune.sh OUT
#
# The base model of eval/study.sh is trained at 8,192 bytes; the default extends it 4× to 32,768 bytes.
# Before fine-tuning, the base model itself is evaluated at the long length (no YaRN: what it does untouched).
# Each run writes OUT/ft_{dense,seer}/metrics.jsonl (step times) and OUT/eval_{base,dense,seer}/results.json.
set -euo pipefail
out=${1:?usage: study_finetune.sh OUT}
MODEL=${MODEL:?set MODEL to the base model directory}
GATES=${GATES:?set GATES to its gates directory}
SEQ=${SEQ:-32768}
FACTOR=${FACTOR:-4}
STEPS=${STEPS:-150}
LR=${LR:-1e-4}
DENSITY=${DENSITY:-0.5}
EVAL_SEQS=${EVAL_SEQS:-4}
MESH=${MESH:-}
EXTRA=${EXTRA:-}  # e.g. "--dtype float32 --implementation reference" on a CPU
SJ=${SEERJAX:-seerjax}
mesh_flag=()
[[ -n $MESH ]] && mesh_flag=(--mesh "$MESH")
eval_flags=(--data embedded:heldout --seq-len "$SEQ" --num-sequences "$EVAL_SEQS" --retrieval-lengths "$SEQ"
            --retrieval-samples 1 --no-progress $EXTRA)

echo "== eval: base model at $SEQ, before fine-tuning $(date -u +%T)"
$SJ eval --model "$MODEL" --gates "$GATES" --methods seer --densities "$DENSITY" "${eval_flags[@]}" \
  --out "$out/eval_base"
for att in dense seer; do
  echo "== finetune ($att attention, YaRN ×$FACTOR, $SEQ, $STEPS steps) $(date -u +%T)"
  $SJ finetune --model "$MODEL" --gates "$GATES" --data embedded:train --seq-len "$SEQ" --rope-scaling yarn \
    --rope-factor "$FACTOR" --steps "$STEPS" --lr "$LR" --warmup $((STEPS / 10 + 1)) --attention "$att" \
    --density "$DENSITY" --batch 1 --save-every "$STEPS" --no-progress "${mesh_flag[@]}" $EXTRA \
    --out "$out/ft_$att"
  tail -n 1 "$out/ft_$att/metrics.jsonl"
  echo "== eval: after $att fine-tuning $(date -u +%T)"
  $SJ eval --model "$out/ft_$att" --gates "$out/ft_$att" --methods seer --densities "$DENSITY" "${eval_flags[@]}" \
    --out "$out/eval_$att"
done
python3 - "$out" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
print("| model | dense PPL | seer PPL | seer retrieval | median step s |")
print("|---|---|---|---|---|")
for name in ("base", "dense", "seer"):
    recs = json.load(open(f"{out}/eval_{name}/results.json"))
    dense = next(r for r in recs if r["method"] == "dense")
    seer = next(r for r in recs if r["method"] == "seer")
    step = ""
    if name != "base":
        lines = [json.loads(x) for x in open(f"{out}/ft_{name}/metrics.jsonl")]
        step = f"{statistics.median(x['step_s'] for x in lines[1:] if 'step_s' in x) if len(lines) > 1 else float('nan'):.3f}"
    print(f"| {name} | {dense['ppl']:.4f} | {seer['ppl']:.4f} | {seer['retrieval']:.2f} | {step} |")
EOF
echo "== done $(date -u +%T)"
