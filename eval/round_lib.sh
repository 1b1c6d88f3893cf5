# Shared by the device-round scripts (eval/gpu_round.sh, eval/x2_round.sh); source it after setting `out`.

run() {  # name cap command...: runs the command under `timeout cap`, log in $out/name.log with its exit code
  local name=$1 cap=$2
  shift 2
  echo "== $name (cap ${cap}s) $(date -u +%T)"
  timeout "$cap" "$@" > "$out/$name.log" 2>&1
  echo "rc=$?" >> "$out/$name.log"
  tail -n 4 "$out/$name.log"
}
