"""The README's main command, `seerjax demo`, end to end at its tiny scale (every stage, real files)."""

from __future__ import annotations

import json
import math


from seerjax.cli import main


def test_demo_runs_every_stage_and_writes_the_table_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--scale", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert (out / "base" / "model" / "config.json").exists()
    assert (out / "gates" / "gates.safetensors").exists() and (out / "gates" / "gate_config.json").exists()
    records = json.loads((out / "eval" / "results.json").read_text())
    grid = {(r["method"], r["density"]) for r in records}
    methods = ("seer", "oracle", "streaming", "vertical_slash", "quest", "moba")
    assert grid == {("dense", 1.0)} | {(m, d) for m in methods for d in (0.5, 0.25, 0.1)}
    for r in records:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0
        assert 0.0 <= r["recall"] <= 1.0 + 1e-6 and 0.0 <= r["retrieval"] <= 1.0
        assert 0.0 < r["achieved_density"] <= 1.0
    assert (out / "eval" / "ppl_vs_density.png").stat().st_size > 0
    assert (out / "eval" / "gate_vs_truth.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| dense | 1.0 |" in printed and "done in" in printed


def test_demo_bad_densities_are_named(tmp_path, capsys):
    assert main(["demo", "--scale", "tiny", "--out", str(tmp_path), "--densities", "0.5,half"]) == 2
    assert "--densities must be comma-separated numbers, got '0.5,half'" in capsys.readouterr().err
