"""The GPU benchmark scripts and device-round shell scripts stay runnable: shell syntax, argument parsing, and
the one benchmark that also runs on a CPU (bench_gate, at a tiny length)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("script", ["study.sh", "study_finetune.sh", "gpu_round.sh", "x2_round.sh", "round_lib.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "eval" / script)], check=True)


@pytest.mark.parametrize("script", ["gpu_round.sh", "x2_round.sh"])
def test_rounds_reject_unknown_steps(script, tmp_path):
    p = subprocess.run(["bash", str(ROOT / "eval" / script), str(tmp_path), "bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown step bogus" in p.stderr


@pytest.mark.parametrize(
    "script", ["bench_kernels.py", "bench_prefill.py", "bench_gate.py", "bench_finetune.py", "tune_kernels.py", "gap_by_position.py"]
)
def test_benchmarks_parse_their_arguments(script):
    p = subprocess.run([sys.executable, str(ROOT / "eval" / script), "--help"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "usage" in p.stdout


def test_bench_gate_runs_on_cpu(tmp_path):
    out = tmp_path / "gate.json"
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "bench_gate.py"), "--lengths", "256", "--reps", "1",
                        "--grains", "2x4", "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["rows"]
    steps = {r["step"] for r in rows}
    assert {"pool q (avg)", "gate, bf16 scores", "select_blocks (premasked)", "gate + select + lists",
            "gate 2x4 sub-blocks, bf16 scores", "gate 2x4 + select + lists"} <= steps
    assert all(r["ms_per_layer"] > 0 for r in rows)


def test_merge_results_keeps_dense_once_and_rejects_disagreeing_parts(tmp_path):
    from seerjax.eval.harness import EvalError, merge_results

    def record(method, density, ppl):
        return {"method": method, "density": density, "threshold": None, "achieved_density": density,
                "ppl": ppl, "recall": 1.0, "retrieval": 1.0}

    parts = []
    for i, methods in enumerate([("seer", "oracle"), ("moba",)]):
        part = tmp_path / f"part{i}"
        part.mkdir()
        recs = [record("dense", 1.0, 2.0)] + [record(m, 0.1, 2.1 + i) for m in methods]
        (part / "results.json").write_text(json.dumps(recs))
        parts.append(str(part))
    merged = merge_results(str(tmp_path / "all"), parts)
    assert [r["method"] for r in merged] == ["dense", "seer", "oracle", "moba"]
    assert json.loads((tmp_path / "all" / "results.json").read_text()) == merged
    assert "| moba | 0.1 |" in (tmp_path / "all" / "results.md").read_text()
    (pathlib.Path(parts[1]) / "results.json").write_text(json.dumps([record("dense", 1.0, 2.5)]))
    with pytest.raises(EvalError, match="dense PPL differs"):
        merge_results(str(tmp_path / "bad"), parts)
    # A part whose evaluation died (no results.json) is named, and nothing is written.
    (tmp_path / "part2").mkdir()
    with pytest.raises(EvalError, match=r"no results.json in \['.*part2'\]: those evaluations did not finish"):
        merge_results(str(tmp_path / "lost"), [parts[0], str(tmp_path / "part2")])
    assert not (tmp_path / "lost").exists()


def test_tune_kernels_rejects_a_malformed_tile_by_name():
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "tune_kernels.py"), "pooled", "--tiles", "128x64x4"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode != 0 and "'128x64x4' is not block_qxblock_kxwarpsxstages" in p.stderr
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "tune_kernels.py"), "pooled", "--rounds", "0"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "--rounds must be >= 1, got 0" in p.stderr


def test_gap_by_position_names_bad_edges():
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "gap_by_position.py"), "--model", "m", "--gates", "g",
                        "--seq-len", "1024", "--edges", "0,2048"], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "--edges must rise strictly from 0 and stay below --seq-len=1024, got '0,2048'" in p.stderr


def test_tune_kernels_sweeps_the_sub_block_kernel_on_cpu(tmp_path):
    """`tune_kernels.py sub_block` times launches (interpret mode here) and checks each against the default's."""
    out = tmp_path / "tune.json"
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "tune_kernels.py"), "sub_block", "--length", "1024",
                        "--grain", "2x4", "--tiles", "16x32x4x2", "--json", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tq"], r["tk"], r["default"]) for r in rows] == [(16, 16, True), (16, 32, False)], rows
    assert all(r["ms"] > 0 and r["max_abs_diff"] <= 1e-3 for r in rows), rows
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "tune_kernels.py"), "sub_block", "--grain", "3x8"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "--grain" in p.stderr and "'3x8'" in p.stderr


def test_tune_kernels_parses_launches_and_backward_plans():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        import tune_kernels
    finally:
        sys.path.remove(str(ROOT / "eval"))
    assert tune_kernels.parse_launches("c2-pp-fast-pers132-hm-lr,t2-s3,c2-fast-rb8") == [
        dict(consumers=2, pingpong=True, pair_blocks=True, early_wait=True, auto_barriers=False, persistent=132,
             head_major=True, late_release=True),
        dict(tiles_per_wg=2, stages=3),
        dict(consumers=2, pair_blocks=True, early_wait=True, auto_barriers=False, rowmax_batch=8),
    ]
    assert tune_kernels.parse_bwd_plans("first,tuned,dq2-kc2-loop-ov-fd-noab-s3") == [
        {}, {"tuned": True},
        dict(dq_consumers=2, dkdv_consumers=2, kv_loop=True, overlap=True, fused_delta=True, auto_barriers=False,
             stages=3),
    ]
    mask = np.asarray(tune_kernels.rows_of_k_blocks(0, 2, 40, 5))  # the items sweep's masks
    assert mask.shape == (1, 2, 40, 40) and (mask.sum(-1) == np.minimum(np.arange(40) + 1, 5)).all()
    assert mask[0, :, np.arange(40), np.arange(40)].all() and not np.triu(mask, 1).any()
    with pytest.raises(SystemExit, match="--launches: 'pers' in 'c2-pers' is not cN"):
        tune_kernels.parse_launches("c2-pers")
    with pytest.raises(SystemExit, match="--bwd-plans: 'dq' in 'dq' is not first"):
        tune_kernels.parse_bwd_plans("dq")


def test_profile_summary_reads_ncu_source_csv(tmp_path, capsys):
    """profile_forward.summarize: the consumer code (before the producer's register release) split into per-step and
    per-item instructions by execution count; a file without ncu's source table is refused by name."""
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        import profile_forward
    finally:
        sys.path.remove(str(ROOT / "eval"))
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
            "stall_barrier", "stall_long_sb (Not Issued)"]
    rows = [
        ["0x0", "S2R R0, SR_TID.X", "10", "100", "5", "0", "0"],                 # once per item
        ["0x10", "MUFU.EX2 R1, R1", "60", "800", "0", "0", "0"],                 # per step (8 steps per item)
        ["0x20", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "30", "800", "0", "25", "9"],  # per step
        ["0x30", "USETMAXREG.DEALLOC.CTAPOOL 0x28", "0", "4", "0", "0", "0"],   # the producer from here on
        ["0x40", "@!P1 BRA 0x100", "999", "50", "999", "0", "0"],
    ]
    text = '"Kernel Name","entry_mosaic_gpu_kernel"\n' + "\n".join(
        ",".join(f'"{c}"' for c in r) for r in [head, *rows])
    path = tmp_path / "sass.csv"
    path.write_text("==PROF== something\n" + text + "\n")
    out = profile_forward.summarize(path, steps_per_item=8, top=3)
    assert out["consumer_samples"] == 100 and out["local_memory_instructions"] == 0
    assert out["by_kind"] == pytest.approx({"per step": 0.9, "per item": 0.1})
    assert out["by_opcode"]["MUFU"] == pytest.approx(0.6)
    assert out["top"][0]["sass"].startswith("MUFU") and out["top"][1]["reasons"] == {"stall_barrier": 25.0}
    assert "per step 90.0%" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text('"a","b"\n"1","2"\n')
    with pytest.raises(SystemExit, match="no table with a 'Source' column"):
        profile_forward.summarize(bad, steps_per_item=1)


def test_device_ms_batches_calls_and_refuses_bad_arguments():
    import time

    import jax.numpy as jnp

    from seerjax.eval.timing import device_ms

    calls = []

    def fast(x):
        calls.append(1)
        return x + 1

    x = jnp.ones(4)
    ms = device_ms(fast, x, warmup=2, reps=3, batch_ms=1000.0, max_calls=7)
    assert len(calls) == 2 + 3 * 7  # warm-up, then 3 batches of max_calls back-to-back calls
    assert ms > 0

    calls.clear()

    def slow(x):
        calls.append(1)
        time.sleep(0.03)
        return x

    ms = device_ms(slow, x, warmup=1, reps=2, batch_ms=10.0)
    assert len(calls) == 1 + 2 and ms >= 30.0  # a call longer than a batch: one call per batch
    for bad in (dict(reps=0), dict(reps=True), dict(warmup=0), dict(batch_ms=0.0), dict(max_calls=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            device_ms(fast, x, **bad)


def test_bench_kernels_refuses_zero_reps():
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "bench_kernels.py"), "--reps", "0"], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "--reps must be >= 1, got 0" in p.stderr


def test_interleaved_ms_times_every_case_each_round():
    import jax.numpy as jnp

    from seerjax.eval.timing import interleaved_ms

    order = []

    def case(name):
        def fn(x):
            order.append(name)
            return x + 1
        return fn

    x = jnp.ones(4)
    # warmup=2: the first call compiles, the second sizes the batch (max_calls unless a call took 500 ms)
    out = interleaved_ms({"a": (case("a"), (x,)), "b": (case("b"), (x,))}, reps=3, warmup=2, batch_ms=1000.0,
                         max_calls=2)
    assert set(out) == {"a", "b"}
    for r in out.values():
        assert r["calls"] == 2 and len(r["rounds"]) == 3 and r["ms"] > 0 and r["ms_sync"] > 0
    # warm-up (2 calls each), then per round a batch of 2 and one synchronized call of each, round r from case r on
    assert order == ["a", "a", "b", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3
    with pytest.raises(ValueError, match="cases is empty"):
        interleaved_ms({})
    with pytest.raises(ValueError, match="reps must be an int >= 1, got 0"):
        interleaved_ms({"a": (case("a"), (x,))}, reps=0)


def test_bench_kernels_runs_on_cpu(tmp_path):
    """The whole benchmark loop at a tiny size: interpret-mode kernels, XLA dense attention as the baseline."""
    out = tmp_path / "kernels.json"
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "bench_kernels.py"), "--lengths", "256", "--densities",
                        "1.0,0.5", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "64", "--mask-heads", "kv",
                        "--implementation", "pallas_interpret", "--dense-implementation", "xla", "--reps", "2",
                        "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["args"]["timing"] == "device"
    rows = {(r["kernel"], r["density"], r["pass_"]): r for r in data["rows"]}
    assert ("xla dense", 1.0, "fwd") in rows and ("xla dense", 1.0, "bwd") in rows
    for dens in (1.0, 0.5):
        fwd = rows[("block_sparse (kv masks)", dens, "fwd")]
        assert fwd["ms"] > 0 and fwd["ms_sync"] > 0 and len(fwd["rounds"]) == 2 and fwd["speedup"] > 0
        assert rows[("block_sparse (kv masks)", dens, "bwd")]["tflops"] > 0
    assert rows[("pooled (1-pass)", 1.0, "fwd")]["vs_cudnn"] > 0
    assert "| 256 | block_sparse (kv masks) | 0.5 | fwd |" in p.stdout


def _seerjax_stub(tmp_path, writes: str):
    """A stand-in for the seerjax command: logs each call's arguments and writes `writes` ("metrics.jsonl" or
    "results.md") into the directory after --out. Returns (stub, log)."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "sj"
    content = "{}" if writes == "metrics.jsonl" else "| x |"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f"echo \"$*\" >> {log}\n"
        f"while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && mkdir -p \"$2\" && echo '{content}' > \"$2/{writes}\"; shift; done\n"
    )
    stub.chmod(0o755)
    return stub, log


def _study(stage: str, out, env):
    return subprocess.run(["bash", str(ROOT / "eval" / "study.sh"), stage, str(out)], env=env, capture_output=True, text=True)


def test_study_pretrain_stages_pass_their_settings(tmp_path):
    """eval/study.sh with STAGE1: a first pretrain at the shorter length, then the main one from its model, each
    with its own length, steps, batch and lr and the shared preset and rope theta (a stub stands in for seerjax)."""
    stub, log = _seerjax_stub(tmp_path, "metrics.jsonl")
    env = dict(ENV, SEERJAX=str(stub), SEQ="16384", STAGE1="8192:2800:8:2e-3", PRETRAIN_STEPS="1500",
               PRETRAIN_BATCH="4", PRETRAIN_LR="1e-3", ROPE_THETA="20000", PRESET="tiny", RETRIEVAL_MIN_FRACTION="0.5")
    p = _study("pretrain", tmp_path / "out", env)
    assert p.returncode == 0, p.stderr
    first, main = log.read_text().splitlines()
    out = tmp_path / "out"
    assert f"--out {out}/base_stage1 --seq-len 8192 --steps 2800 --batch 8 --lr 2e-3" in first
    assert f"--out {out}/base --seq-len 16384 --steps 1500 --batch 4 --lr 1e-3 --retrieval-min-fraction 0.5" in main
    assert "--retrieval-min-fraction" not in first  # the first stage keeps the default spread of lengths
    assert main.endswith(f"--init-model {out}/base_stage1/model") and "--init-model" not in first
    assert all("--preset tiny --rope-theta 20000" in c for c in (first, main))

    log.unlink()  # ROPE_SCALING extends the main stage's context; the first stage keeps plain RoPE
    p = _study("pretrain", tmp_path / "scaled", dict(env, ROPE_SCALING="llama3:2", PASSKEY_MIN_FRACTION="1.0"))
    assert p.returncode == 0, p.stderr
    first, main = log.read_text().splitlines()
    assert main.endswith(f"--init-model {tmp_path}/scaled/base_stage1/model --rope-scaling llama3:2 --passkey-min-fraction 1.0")
    assert "--rope-scaling" not in first and "--passkey-min-fraction" not in first

    log.unlink()
    env["STAGE1"] = "8192:2800"
    p = _study("pretrain", tmp_path / "bad", env)
    assert p.returncode == 2 and "STAGE1 must be SEQ:STEPS:BATCH:LR" in p.stderr and "'8192:2800'" in p.stderr
    assert not log.exists()


def test_study_eval_selects_the_dense_last_row_unless_told_otherwise(tmp_path):
    """eval/study.sh eval passes --dense-last-rows 1 to every evaluation by default; SELECT="" passes none and
    SELECT="--keep-first" passes exactly that (a stub stands in for seerjax)."""
    stub, log = _seerjax_stub(tmp_path, "results.md")
    for select, expect in ((None, "--dense-last-rows 1"), ("", None), ("--keep-first", "--keep-first")):
        env = dict(ENV, SEERJAX=str(stub))
        if select is not None:
            env["SELECT"] = select
        p = _study("eval", tmp_path / "out", env)
        assert p.returncode == 0, p.stderr
        calls = log.read_text().splitlines()
        log.unlink()
        assert len(calls) == 2 and all(c.startswith("eval ") for c in calls), calls
        for c in calls:
            assert "--num-sequences 16 --recall-sequences 8 " in c, c  # recall on 8 of the 16 by default
            assert ("--dense-last-rows" in c) == (expect == "--dense-last-rows 1"), (select, c)
            assert ("--keep-first" in c) == (expect == "--keep-first"), (select, c)
            if expect:
                assert f"--no-progress {expect}" in c, c


def test_study_eval_measures_recall_on_at_most_eight_sequences(tmp_path):
    """RECALL_SEQS defaults to 8, or to EVAL_SEQS when fewer are evaluated (eval refuses more); an explicit value is
    passed as it is (a stub stands in for seerjax)."""
    stub, log = _seerjax_stub(tmp_path, "results.md")
    for extra, expect in (({"EVAL_SEQS": "4"}, "--num-sequences 4 --recall-sequences 4 "),
                          ({"EVAL_SEQS": "12", "RECALL_SEQS": "2"}, "--num-sequences 12 --recall-sequences 2 ")):
        p = _study("eval", tmp_path / "out", dict(ENV, SEERJAX=str(stub), **extra))
        assert p.returncode == 0, p.stderr
        calls = log.read_text().splitlines()
        log.unlink()
        assert len(calls) == 2 and all(expect in c for c in calls), calls


def test_study_distill_scores_at_8x8_sub_blocks_unless_told_otherwise(tmp_path):
    """eval/study.sh distill passes --q-sub-blocks 8 --k-sub-blocks 8 to both distillations by default (with the
    study's 12,000-step schedule), and the environment's grain when given (a stub stands in for seerjax)."""
    stub, log = _seerjax_stub(tmp_path, "metrics.jsonl")
    for grain, expect in ((None, ("8", "8")), (("1", "4"), ("1", "4"))):
        env = dict(ENV, SEERJAX=str(stub))
        if grain:
            env["Q_SUB_BLOCKS"], env["K_SUB_BLOCKS"] = grain
        p = _study("distill", tmp_path / "out", env)
        assert p.returncode == 0, p.stderr
        calls = log.read_text().splitlines()
        log.unlink()
        assert len(calls) == 2 and all(c.startswith("distill ") for c in calls), calls
        for c in calls:
            assert f"--q-sub-blocks {expect[0]} --k-sub-blocks {expect[1]}" in c, c
            if grain is None:  # the sixteenth session's measured schedule: 12,000 steps, warm-up 1,201, every row
                assert "--steps 12000 " in c and "--warmup 1201 " in c and "--skip-fraction 0 " in c, c
