"""`seerjax eval` end to end on a tiny model: every method, results.json, table and plots."""

import json
import subprocess
import sys

import numpy as np

from test_distill import _write_tiny_checkpoint


def _run(args):
    p = subprocess.run([sys.executable, "-m", "seerjax", *args], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_distill_then_eval_every_method(tmp_path):
    model, text, docs = tmp_path / "model", tmp_path / "data.txt", tmp_path / "docs"
    model.mkdir()
    docs.mkdir()
    _write_tiny_checkpoint(model, text)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(10):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=300)))
    common = ["--model", str(model), "--data", str(docs), "--seq-len", "256", "--dtype", "float32",
              "--implementation", "reference", "--no-progress"]
    _run(["distill", *common, "--steps", "4", "--block-size", "16", "--d-gate", "32", "--out", str(tmp_path / "gates")])
    out = _run(["eval", *common, "--gates", str(tmp_path / "gates"), "--densities", "1.0,0.25", "--thresholds", "0.01",
                "--num-sequences", "1", "--retrieval-samples", "1", "--retrieval-depths", "0.2,0.8",
                "--out", str(tmp_path / "eval")])
    assert "| seer |" in out
    records = json.loads((tmp_path / "eval" / "results.json").read_text())
    methods = {r["method"] for r in records}
    assert methods == {"dense", "seer", "oracle", "streaming", "vertical_slash", "quest", "moba"}
    for r in records:
        assert set(r) >= {"method", "density", "achieved_density", "ppl", "recall", "retrieval"}
        assert np.isfinite(r["ppl"]) and 0 <= r["recall"] <= 1 + 1e-6 and 0 <= r["retrieval"] <= 1
        assert list(r["retrieval_by_length"]) == ["256"] and r["retrieval_by_length"]["256"] == r["retrieval"]
        by_depth, cells = r["retrieval_by_depth"], r["retrieval_by_length_depth"]
        assert list(by_depth) == ["0.2", "0.8"] and list(cells) == ["256@0.2", "256@0.8"], r
        assert set(by_depth.values()) <= {0.0, 1.0} and np.mean(list(by_depth.values())) == r["retrieval"]
        assert [by_depth[d] for d in ("0.2", "0.8")] == [cells[f"256@{d}"] for d in ("0.2", "0.8")]
        # Both protocols are recorded; with dense attention (or density 1.0) they are the same run.
        assert 0 <= r["retrieval_prefill"] <= 1 and r["retrieval_prefill_by_length"]["256"] == r["retrieval_prefill"]
        if r["method"] == "dense" or r["density"] == 1.0:
            assert r["retrieval_prefill"] == r["retrieval"], r
    # The recall ceiling (blocks picked by true attention mass, same budget) bounds every method at its density.
    for r in records:
        if r["method"] == "dense" or r["threshold"] is not None:
            assert "recall_ceiling" not in r, r
        else:
            assert r["recall"] <= r["recall_ceiling"] + 1e-4 <= 1 + 2e-4, r
    at = {r["method"]: r for r in records if r["density"] == 0.25 and r["threshold"] is None}
    assert len({r["recall_ceiling"] for r in at.values()}) == 1, at
    assert at["streaming"]["recall"] < at["streaming"]["recall_ceiling"] - 1e-3, at["streaming"]
    dense = next(r for r in records if r["method"] == "dense")
    for r in records:
        if r["density"] == 1.0:
            assert abs(r["ppl"] - dense["ppl"]) < 1e-3 * dense["ppl"], r
            assert r["recall"] > 0.999
    assert (tmp_path / "eval" / "ppl_vs_density.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "gate_vs_truth.png").stat().st_size > 1000
    assert "retrieval, dense decode" in (tmp_path / "eval" / "results.md").read_text()
    assert "recall ceiling" in (tmp_path / "eval" / "results.md").read_text()

    # Selection options apply to every sparse method alike: keeping the first block and dense last rows can
    # only add blocks, so each method's achieved density rises above its plain TopK run.
    _run(["eval", *common, "--gates", str(tmp_path / "gates"), "--densities", "0.25", "--methods", "seer,streaming,quest",
          "--keep-first", "--dense-last-rows", "2", "--num-sequences", "1", "--retrieval-samples", "1",
          "--retrieval-depths", "0.5", "--out", str(tmp_path / "eval_opts")])
    plain = {r["method"]: r for r in records if r["density"] == 0.25 and r.get("threshold") is None}
    for r in json.loads((tmp_path / "eval_opts" / "results.json").read_text()):
        if r["method"] != "dense":
            assert r["achieved_density"] > plain[r["method"]]["achieved_density"] + 0.01, (r, plain[r["method"]])
