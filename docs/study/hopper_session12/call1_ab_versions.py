"""Throwaway (not committed): the Hopper forward of earlier commits against HEAD's, interleaved rounds."""
import importlib.util, json, os, sys, statistics, functools
import jax, jax.numpy as jnp
from seerjax.eval.timing import median_ms, pipelined_ms
from seerjax.eval.bench_kernels import random_mask, _sparse
from seerjax.kernels.checks import check_attention_inputs
from seerjax.kernels import hopper as cur

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m

out = os.environ.get("OUT", "/tmp")
lengths = [int(x) for x in sys.argv[1].split(",")]
rounds = int(sys.argv[2])
vers = sys.argv[3].split(",")
res = {}
for t in lengths:
    key = jax.random.key(t); kq, kk, kv, km, kg = jax.random.split(key, 5)
    q = jax.random.normal(kq, (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (1, t, 8, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (1, t, 8, 128), jnp.bfloat16)
    mask = random_mask(km, 1, 8, t // 64, t // 64, 0.1)
    sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
    fns = {"cudnn": jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))}
    fns["dispatch"] = jax.jit(functools.partial(_sparse, bs=64, implementation=None))
    ref = None
    for ver in vers:
        mod = cur if ver == "HEAD" else load(f"eval/_ab/hopper_{ver}.py", f"hopper_{ver}")
        launch = mod.tuned_launch(sh, 8, 132)
        fns[ver] = jax.jit(lambda q, k, v, m, mod=mod, launch=launch: mod.block_sparse_attention_hopper(q, k, v, m, sh, **launch))
    outs = {n: f(q, k, v, mask) for n, f in fns.items() if n != "cudnn"}
    base = outs["dispatch"].astype(jnp.float32)
    for n, o in outs.items():
        print(t, n, "max|diff| vs dispatch", float(jnp.max(jnp.abs(o.astype(jnp.float32) - base))), flush=True)
    reps = 10 if t <= 32768 else 3
    rec = {n: {"median": [], "pipelined": []} for n in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            rec[n]["median"].append(median_ms(fns[n], q, k, v, mask, reps=reps if n != "cudnn" or t <= 32768 else 2))
            rec[n]["pipelined"].append(pipelined_ms(fns[n], q, k, v, mask, reps=3 * reps if n != "cudnn" or t <= 32768 else 2))
        print(t, "round", r, {n: (round(rec[n]["median"][-1], 3), round(rec[n]["pipelined"][-1], 3)) for n in names}, flush=True)
    print(f"\n{t}: kernel | median of round medians | min | median of pipelined | min | cudnn ratio (med/pipe)")
    for n in names:
        mm, pp = statistics.median(rec[n]["median"]), statistics.median(rec[n]["pipelined"])
        cm, cp = statistics.median(rec["cudnn"]["median"]), statistics.median(rec["cudnn"]["pipelined"])
        print(f"{n:10s} {mm:8.3f} {min(rec[n]['median']):8.3f} {pp:8.3f} {min(rec[n]['pipelined']):8.3f}  {cm/mm:5.2f} {cp/pp:5.2f}")
    res[t] = rec
    json.dump(res, open(f"{out}/ab_versions.json", "w"), indent=1)
