#!/usr/bin/env bash
# One device call's worth of pending GPU checks, each step capped, logs and JSON under OUT.
#
#   bash eval/gpu_round.sh OUT [STEP ...]
#
# Steps (default: all, in this order; each capped with `timeout`; a failing step does not stop the others):
#   tests   compiled correctness tests, in ten pytest processes side by side (every property example compiles
#           its own kernels, so one process is CPU-bound on compilation; the device has 16 host cores)
#   gate    eval/bench_gate.py at 32k and 128k
#   tune    eval/tune_kernels.py: pooled tiles TILES side by side at 32k (5 rounds), Hopper ring depth / warpgroups at 128k
#   kernels eval/bench_kernels.py, the full three-length table, Triton and Hopper forwards side by side
#   prefill eval/bench_prefill.py at 32k, 64k, 128k
# Caps come from the environment: CAP_TESTS (s, default 240), CAP_BENCH (s, default 330); SEERJAX_MAX_EXAMPLES
# (default 3) caps the property tests.
set -uo pipefail
out=${1:?usage: gpu_round.sh OUT [STEP ...]}
shift
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(tests gate tune kernels prefill)
mkdir -p "$out"
CAP_TESTS=${CAP_TESTS:-240}
CAP_BENCH=${CAP_BENCH:-330}
TILES=${TILES:-128x64x8x3,128x64x4x2}  # the pooled tiles timed side by side (the default first)
export SEERJAX_MAX_EXAMPLES=${SEERJAX_MAX_EXAMPLES:-3}

source "$(dirname "$0")/round_lib.sh"

for step in "${steps[@]}"; do
  case $step in
    tests)
      py=(python3 -m pytest -m gpu -q -p no:cacheprovider)
      export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the processes share the GPU
      # float32 items compile slowest: three processes (non-causal; causal two-pass; causal one-pass), as one did
      # not finish its 12 in 250 s and the causal half did not finish its 6 in 240 s
      run t_pool_f32_a "$CAP_TESTS" "${py[@]}" tests/test_pooling.py -k "TestCompiledOnGpu and float32 and False" &
      run t_pool_f32_b "$CAP_TESTS" "${py[@]}" tests/test_pooling.py -k "TestCompiledOnGpu and float32 and True and two_pass" &
      run t_pool_f32_c "$CAP_TESTS" "${py[@]}" tests/test_pooling.py -k "TestCompiledOnGpu and float32 and True and one_pass" &
      run t_pool_rest "$CAP_TESTS" "${py[@]}" tests/test_pooling.py \
        -k "TestCompiledOnGpu and not float32 and not edge_cases and not production" &
      run t_pool_edge "$CAP_TESTS" "${py[@]}" tests/test_pooling.py \
        -k "TestCompiledOnGpu and not float32 and (edge_cases or production)" &
      run t_sparse "$CAP_TESTS" "${py[@]}" tests/test_block_sparse.py tests/test_topk.py tests/test_block_pool.py &
      # the Hopper tests in three groups: one process ran 52 of the forward file's 60 in 230 s (tenth session)
      run t_hopper_launch "$CAP_TESTS" "${py[@]}" tests/test_hopper.py -k "launch_options or dispatch" &
      run t_hopper_rest "$CAP_TESTS" "${py[@]}" tests/test_hopper.py -k "not (launch_options or dispatch)" &
      run t_hopper_bwd "$CAP_TESTS" "${py[@]}" tests/test_hopper_bwd.py &
      run t_other "$CAP_TESTS" "${py[@]}" tests/test_sub_block_scores.py tests/test_model_hf.py &
      wait
      unset XLA_PYTHON_CLIENT_PREALLOCATE
      # one file for the ten logs: the device tool returns at most 8 files per call (eleventh session)
      for f in "$out"/t_*.log; do echo "==== $(basename "$f")"; cat "$f"; done > "$out/tests.log" && rm -f "$out"/t_*.log
      ;;
    gate) run gate 120 python3 eval/bench_gate.py --lengths 32768,131072 --json "$out/gate.json" ;;
    tune)
      run tune_pooled "$CAP_BENCH" python3 eval/tune_kernels.py pooled --length 32768 --tiles "$TILES" --rounds 5 \
        --json "$out/tune_pooled.json"
      run tune_hopper "$CAP_BENCH" python3 eval/tune_kernels.py hopper --length 131072 --densities 0.1 \
        --json "$out/tune_hopper.json"
      run tune_backward "$CAP_BENCH" python3 eval/tune_kernels.py backward --length 32768 --densities 0.1 \
        --json "$out/backward.json"
      ;;
    kernels)
      run kernels "$CAP_BENCH" python3 eval/bench_kernels.py --lengths 8192,32768,131072 --densities 1.0,0.5,0.1 \
        --implementation pallas,hopper --reps 5 --json "$out/kernels.json"
      ;;
    prefill)
      run prefill "$CAP_BENCH" python3 eval/bench_prefill.py --lengths 32768,65536,131072 --densities 0.5,0.1 \
        --reps 2 --json "$out/prefill.json"
      ;;
    *) echo "unknown step $step (tests, gate, tune, kernels, prefill)" >&2; exit 2 ;;
  esac
done
echo "== done $(date -u +%T)"
