"""Throwaway A/B: gate distillation at 16k with the loss read every step (old loop) vs one step late (LaggedSteps)."""
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
spec = importlib.util.spec_from_file_location("old_distill", os.path.join(os.path.dirname(__file__), "_old_distill.py"))
old = importlib.util.module_from_spec(spec)
sys.modules["old_distill"] = old
spec.loader.exec_module(old)
from seerjax.hf import from_pretrained  # noqa: E402
from seerjax.train import distill as new  # noqa: E402
from seerjax.train.data import load_tokenizer, packed_from_source  # noqa: E402

model_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = packed_from_source("embedded:train", load_tokenizer(model_dir), 16384, seed=0, retrieval_docs=4000)
rows = []
for rnd in range(2):
    for name, mod in (("old", old), ("new", new)):
        model = from_pretrained(model_dir, dtype="bfloat16")
        s = mod.DistillSettings(model=model_dir, data="embedded:train", seq_len=16384, steps=steps,
                                out=f"{out}/{name}{rnd}", block_size=64, gate_heads="query", d_gate=128,
                                gate_type="Qavgmax_Kmaxminavg", skip_fraction=0.0, lr=1e-3, warmup=100,
                                save_every=steps, progress=False)
        t0 = time.perf_counter()
        r = mod.distill(s, model=model, data=data)
        wall = time.perf_counter() - t0
        m = [json.loads(x) for x in open(f"{out}/{name}{rnd}/metrics.jsonl")]
        first = m[0]["step_s"]
        rows.append({"loop": name, "round": rnd, "steps": steps, "wall_s": wall, "first_step_s": first,
                     "ms_per_step_after_first": 1e3 * (wall - first) / (steps - 1), "final_loss": r.final_loss})
        print(rows[-1], flush=True)
json.dump(rows, open(f"{os.environ.get('OUT', out)}/ab.json", "w"), indent=1)
