#!/usr/bin/env bash
# The embedded-default study (GPU): pretrain a byte-level base model → distill query-head and KV-head
# AttnGates → evaluate dense, seer, the oracle and the four training-free baselines at densities
# 0.5 / 0.25 / 0.1 (perplexity, attention-mass recall, passkey retrieval at several lengths and depths).
#
#   bash eval/study.sh all OUT          # everything (about 25 minutes on one H100)
#   bash eval/study.sh train OUT        # pretrain + both distillations (resumable: re-run to continue)
#   bash eval/study.sh pretrain OUT     # the base model only
#   bash eval/study.sh distill OUT      # both distillations only, from OUT/base/model
#   bash eval/study.sh eval OUT         # both evaluations, from OUT/base/model and OUT/gates_{query,kv}
#
# Sizes come from the environment (defaults: the study recipe on one H100, docs/results.md sixteenth session:
# gates with d_gate 128, q pooled by average and max, scored at 8 x 8 sub-blocks per block, 12,000 steps;
# the CPU tests run it with a stub).
# The 16k study's base model (docs/results.md, seventeenth session; 438 s for both stages on one H100):
#   SEQ=16384 STAGE1=8192:2400:8:2e-3 PRETRAIN_STEPS=1850 PRETRAIN_BATCH=4 PRETRAIN_LR=1e-3 ROPE_SCALING=llama3:2 \
#     PASSKEY_MIN_FRACTION=1.0 bash eval/study.sh pretrain OUT
set -euo pipefail
stage=${1:?usage: study.sh all|train|pretrain|distill|eval OUT}
out=${2:?usage: study.sh all|train|pretrain|distill|eval OUT}
PRESET=${PRESET:-small}
SEQ=${SEQ:-8192}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-5400}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-8}
PRETRAIN_LR=${PRETRAIN_LR:-2e-3}
ROPE_THETA=${ROPE_THETA:-10000}  # 500000 was tried at 16k and set retrieval back (docs/results.md, thirteenth session)
ROPE_SCALING=${ROPE_SCALING:-}  # the main stage's RoPE extension after STAGE1, e.g. llama3:2 (seerjax pretrain --rope-scaling)
STAGE1=${STAGE1:-}  # "SEQ:STEPS:BATCH:LR": a first pretraining stage at a shorter length (the 16k study: 8192:2400:8:2e-3)
RETRIEVAL_DOCS=${RETRIEVAL_DOCS:-12000}
RETRIEVAL_MIN_FRACTION=${RETRIEVAL_MIN_FRACTION:-0.125}  # the main stage's synthetic documents: this fraction of SEQ to all of it
PASSKEY_MIN_FRACTION=${PASSKEY_MIN_FRACTION:-}  # the main stage's passkey documents' own (seerjax pretrain --passkey-min-fraction)
DISTILL_STEPS=${DISTILL_STEPS:-12000}
DISTILL_LR=${DISTILL_LR:-1e-3}
DISTILL_RETRIEVAL_DOCS=${DISTILL_RETRIEVAL_DOCS:-4000}
BLOCK=${BLOCK:-64}
D_GATE=${D_GATE:-128}
GATE_TYPE=${GATE_TYPE:-Qavgmax_Kmaxminavg}  # the gate's poolings (the seed's default: Qavg_Kmaxminavg)
Q_SUB_BLOCKS=${Q_SUB_BLOCKS:-8}  # the gate's scoring grain: sub-blocks per query / key block (seerjax.gate);
K_SUB_BLOCKS=${K_SUB_BLOCKS:-8}  # 1 and 1 score whole blocks, as the seed does (docs/results.md, fifteenth session)
SKIP_FRACTION=${SKIP_FRACTION:-0}  # first query blocks left out of the distillation loss (the seed: 0.25; the 16k study: 0, every row)
DISTILL_HEADS=${DISTILL_HEADS:-query,kv}  # which gates the distill stage trains
EVAL_SEQS=${EVAL_SEQS:-16}
RETRIEVAL_LENGTHS=${RETRIEVAL_LENGTHS:-2048,4096,8192}
RETRIEVAL_SAMPLES=${RETRIEVAL_SAMPLES:-4}
RECALL_SEQS=${RECALL_SEQS:-$(( EVAL_SEQS < 8 ? EVAL_SEQS : 8 ))}  # of the EVAL_SEQS sequences, those that also measure
# attention-mass recall (8, as the seventeenth session; 1 before it)
DENSITIES=${DENSITIES:-0.5,0.25,0.1}
EXTRA=${EXTRA:-}  # e.g. "--dtype float32 --implementation reference" on a CPU
# Selection options of the evaluation, for every method. Default: the last query block (a passkey's question)
# attends densely, inside the same budget (docs/results.md, fourteenth session); SELECT="" for none.
SELECT=${SELECT---dense-last-rows 1}
SJ=${SEERJAX:-seerjax}
PARALLEL=${PARALLEL:-0}  # 1: the two distillations, and the evaluation's methods, run side by side (one GPU)
MODEL=${MODEL:-$out/base/model}  # the base model distill and eval use (e.g. a carried bf16 copy)

if [[ $stage == all || $stage == train || $stage == pretrain ]]; then
  pretrain_args=(--preset "$PRESET" --rope-theta "$ROPE_THETA" --retrieval-docs "$RETRIEVAL_DOCS" --save-every 200 --no-progress
                 $(echo "$EXTRA" | sed 's/--implementation [^ ]*//'))
  init=()
  if [[ -n $STAGE1 ]]; then  # a first stage at a shorter length; the main stage starts from its model
    IFS=: read -r s1_seq s1_steps s1_batch s1_lr <<< "$STAGE1"
    if [[ -z $s1_seq || -z $s1_steps || -z $s1_batch || -z $s1_lr ]]; then
      echo "STAGE1 must be SEQ:STEPS:BATCH:LR (e.g. 8192:2800:8:2e-3), got '$STAGE1'" >&2
      exit 2
    fi
    echo "== pretrain stage 1 ($PRESET, $s1_seq tokens, $s1_steps steps) $(date -u +%T)"
    $SJ pretrain --out "$out/base_stage1" --seq-len "$s1_seq" --steps "$s1_steps" --batch "$s1_batch" --lr "$s1_lr" \
      "${pretrain_args[@]}"
    tail -n 1 "$out/base_stage1/metrics.jsonl"
    init=(--init-model "$out/base_stage1/model")
  fi
  if [[ -n $ROPE_SCALING ]]; then
    init+=(--rope-scaling "$ROPE_SCALING")
  fi
  if [[ -n $PASSKEY_MIN_FRACTION ]]; then
    init+=(--passkey-min-fraction "$PASSKEY_MIN_FRACTION")
  fi
  echo "== pretrain ($PRESET, $SEQ tokens, $PRETRAIN_STEPS steps) $(date -u +%T)"
  $SJ pretrain --out "$out/base" --seq-len "$SEQ" --steps "$PRETRAIN_STEPS" --batch "$PRETRAIN_BATCH" --lr "$PRETRAIN_LR" \
    --retrieval-min-fraction "$RETRIEVAL_MIN_FRACTION" "${pretrain_args[@]}" "${init[@]}"
  tail -n 1 "$out/base/metrics.jsonl"
fi
if [[ $PARALLEL == 1 ]]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the processes share the GPU
fi
side() {  # runs "$@" in the background when PARALLEL=1 (then `wait` collects it), else in the foreground
  if [[ $PARALLEL == 1 ]]; then "$@" & else "$@"; fi
}
if [[ $stage == all || $stage == train || $stage == distill ]]; then
  distill() {
    local heads=$1
    echo "== distill ($heads-head gates, $DISTILL_STEPS steps) $(date -u +%T)"
    $SJ distill --model "$MODEL" --data embedded:train --seq-len "$SEQ" --steps "$DISTILL_STEPS" \
      --out "$out/gates_$heads" --gate-heads "$heads" --block-size "$BLOCK" --d-gate "$D_GATE" --gate-type "$GATE_TYPE" \
      --q-sub-blocks "$Q_SUB_BLOCKS" --k-sub-blocks "$K_SUB_BLOCKS" \
      --lr "$DISTILL_LR" --skip-fraction "$SKIP_FRACTION" \
      --warmup $((DISTILL_STEPS / 10 + 1)) --save-every "$DISTILL_STEPS" --retrieval-docs "$DISTILL_RETRIEVAL_DOCS" \
      --no-progress $EXTRA
    echo "$heads: $(tail -n 1 "$out/gates_$heads/metrics.jsonl")"
  }
  IFS=, read -ra heads_list <<< "$DISTILL_HEADS"
  for heads in "${heads_list[@]}"; do side distill "$heads"; done
  wait
fi
if [[ $stage == all || $stage == eval ]]; then
  common=(--model "$MODEL" --data embedded:heldout --seq-len "$SEQ" --densities "$DENSITIES"
          --num-sequences "$EVAL_SEQS" --recall-sequences "$RECALL_SEQS" --retrieval-lengths "$RETRIEVAL_LENGTHS" --retrieval-samples "$RETRIEVAL_SAMPLES"
          --no-progress $SELECT $EXTRA)
  methods=${QUERY_METHODS:-seer,oracle,streaming,vertical_slash,quest,moba}
  echo "== eval: query-head gates (and $methods) and KV-head gates $(date -u +%T)"
  if [[ $PARALLEL == 1 ]]; then  # the methods two by two in processes side by side, then one merged grid
    parts=()
    IFS=, read -ra list <<< "$methods"
    for ((i = 0; i < ${#list[@]}; i += 2)); do
      part="$out/eval_query_part$((i / 2))"
      parts+=("$part")
      $SJ eval "${common[@]}" --gates "$out/gates_query" --methods "$(IFS=,; echo "${list[*]:i:2}")" --out "$part" \
        > "$part.log" 2>&1 &
    done
  else
    $SJ eval "${common[@]}" --gates "$out/gates_query" --methods "$methods" --out "$out/eval_query"
  fi
  $SJ eval "${common[@]}" --gates "$out/gates_kv" --methods seer --out "$out/eval_kv"
  wait
  if [[ $PARALLEL == 1 ]]; then
    tail -n 2 "${parts[@]/%/.log}"
    python3 -m seerjax.eval.harness merge "$out/eval_query" "${parts[@]}" > /dev/null
  fi
  cat "$out/eval_query/results.md" "$out/eval_kv/results.md"
fi
echo "== done $(date -u +%T)"
