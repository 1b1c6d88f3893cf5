#!/usr/bin/env bash
# The fine-tuning issue's two-GPU checks as one capped device call on `nvidia-h200-x2`; logs and JSON under OUT.
#
#   bash eval/x2_round.sh OUT [STEP ...]      # steps: scaling large (default: both)
#
#   scaling  tokens/s of the Llama-3.2-1B-shaped fine-tuning step with seer 0.1 on one GPU
#            (CUDA_VISIBLE_DEVICES=0) and with --mesh fsdp=2 over both, SEQ tokens per device (default 32768)
#   large    a model whose float32 training state (16 bytes per parameter) is more than one H200's memory:
#            Llama-3.1-8B shape with LAYERS layers (default 40: 9.84B parameters, 157 GB), --mesh fsdp=2
# Caps (s) from the environment: CAP_SCALING (each scaling run, default 200), CAP_LARGE (default 420).
set -uo pipefail
out=${1:?usage: x2_round.sh OUT [scaling] [large]}
shift
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(scaling large)
mkdir -p "$out"
SEQ=${SEQ:-32768}
LAYERS=${LAYERS:-40}
CAP_SCALING=${CAP_SCALING:-200}  # seconds per scaling run
CAP_LARGE=${CAP_LARGE:-420}
bench=(python3 eval/bench_finetune.py --attention seer --densities 0.1)

source "$(dirname "$0")/round_lib.sh"

for step in "${steps[@]}"; do
  case $step in
    scaling)
      CUDA_VISIBLE_DEVICES=0 run ft_1gpu "$CAP_SCALING" "${bench[@]}" --preset llama-1b --seq-len "$SEQ" --steps 4 \
        --json "$out/ft_1gpu.json"
      run ft_fsdp2 "$CAP_SCALING" "${bench[@]}" --preset llama-1b --seq-len "$SEQ" --steps 4 --mesh fsdp=2 \
        --json "$out/ft_fsdp2.json"
      python3 - "$out" <<'EOF'
import json, sys
one, two = (json.load(open(f"{sys.argv[1]}/{n}.json"))["records"][0]["tokens_per_s"] for n in ("ft_1gpu", "ft_fsdp2"))
print(f"fsdp=2 over one GPU: {two / one:.2f}x ({two:,.0f} against {one:,.0f} tokens/s)")
EOF
      ;;
    large)
      run ft_large "$CAP_LARGE" "${bench[@]}" --preset llama-8b --layers "$LAYERS" --seq-len 8192 --steps 2 --mesh fsdp=2 \
        --json "$out/ft_large.json"
      ;;
    *) echo "unknown step $step (scaling, large)" >&2; exit 2 ;;
  esac
done
echo "== done $(date -u +%T)"
