"""Block selection and the sparse attention methods: density, causality, oracle recall, dense equivalence."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seerjax import sparse_attention
from seerjax.config import ModelConfig
from seerjax.eval.harness import EvalError, EvalSettings, block_attention_mass, mass_recall
from seerjax.gates_io import attach_gates, gate_config_for_model
from seerjax.kernels import attention_with_pooling
from seerjax.model import LlamaModel
from seerjax.selection import (
    SelectionConfig,
    SelectionError,
    achieved_density,
    causal_blocks,
    moba_scores,
    proportional_budgets,
    quest_scores,
    row_budgets,
    row_k,
    select_blocks,
    streaming_scores,
    topk_budget,
    vertical_slash_scores,
)

NQ = 64


def _scores(seed=0, b=1, h=2, nq=NQ, nk=NQ):
    return jax.random.uniform(jax.random.key(seed), (b, h, nq, nk))


@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_topk_density_matches_target_and_is_causal_with_diagonal(density):
    mask = np.asarray(select_blocks(_scores(), SelectionConfig(density=density)))
    causal = np.tril(np.ones((NQ, NQ), bool))
    assert not (mask & ~causal).any()
    assert np.diagonal(mask, axis1=2, axis2=3).all()
    got = float(achieved_density(jnp.asarray(mask)).mean())
    assert abs(got - density) < 0.05, got
    k, r = row_budgets(density, NQ, NQ)
    want = np.minimum(np.arange(1, NQ + 1), k) + (np.arange(NQ) >= NQ - r)
    np.testing.assert_array_equal(mask.sum(-1), np.broadcast_to(want, mask.shape[:-1]))


@pytest.mark.parametrize("nq,nk,causal", [(128, 128, True), (32, 32, True), (20, 56, True), (33, 33, False), (7, 7, True)])
@pytest.mark.parametrize("density", [0.5, 0.25, 0.1, 0.03])
def test_topk_budgets_add_up_to_the_density_exactly(nq, nk, causal, density):
    """The seed's floored per-row budget achieves 0.092 at 128 blocks and 0.06 at 32; the budgets now add
    up to floor(density x visible blocks) (at least one per row), the forced diagonal and sink included."""
    seen = np.asarray(causal_blocks(nq, nk, causal)).sum(-1)
    target = max(nq, int(np.floor(density * seen.sum() + 1e-9)))
    k, r = row_budgets(density, nq, nk, causal)
    budget = np.minimum(seen, k + (np.arange(nq) >= nq - r))
    assert budget.sum() == target
    for keep_first in (False, True):
        cfg = SelectionConfig(density=density, keep_first=keep_first)
        mask = np.asarray(select_blocks(_scores(nq=nq, nk=nk), cfg, causal=causal))
        # Only where a row's budget is below its forced blocks (the diagonal and the sink) does it keep more.
        forced = 1 + (keep_first & (np.arange(nq) + nk - nq != 0))  # the sink may be the diagonal
        np.testing.assert_array_equal(mask.sum(-1), np.broadcast_to(np.maximum(budget, forced), mask.shape[:-1]))
        assert np.diagonal(mask, offset=nk - nq, axis1=2, axis2=3).all()
        if keep_first:
            assert mask[..., 0].all()
    assert 0 <= r < nq and k >= 1
    if causal and nq == nk and density == 0.1 and nq == 128:
        assert (k, topk_budget(density, nq)) == (6, 6) and r == 72  # the seed leaves 72 blocks per head unused


@pytest.mark.parametrize("nq,nk,causal", [(128, 128, True), (32, 32, True), (20, 56, True), (33, 33, False)])
@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_proportional_budgets_follow_each_rows_share_and_add_up(nq, nk, causal, density):
    """budget="proportional": each row keeps about density x its visible blocks (at least one, at most all), the
    same total as the uniform rule, and select_blocks keeps exactly that many per row."""
    seen = np.asarray(causal_blocks(nq, nk, causal)).sum(-1)
    target = max(nq, int(np.floor(density * seen.sum() + 1e-9)))
    k = proportional_budgets(density, nq, nk, causal)
    assert k.dtype == np.int32 and k.shape == (nq,)
    assert (k >= 1).all() and (k <= seen).all()
    assert k.sum() == target  # every case here has more blocks to give than rows
    share = density * seen
    assert (np.abs(k - share) < 2).all()  # never more than a block (and the clamp's one) off its share
    if causal and nq == nk:  # the last rows keep as large a share as the rest, unlike the uniform rule
        ku, _ = row_budgets(density, nq, nk, causal)
        assert k[-1] >= ku and abs(k[-1] - density * nk) < 2  # (the early rows' one-block floor comes off the last)
    cfg = SelectionConfig(density=density, budget="proportional")
    mask = np.asarray(select_blocks(_scores(nq=nq, nk=nk), cfg, causal=causal))
    np.testing.assert_array_equal(mask.sum(-1), np.broadcast_to(k, mask.shape[:-1]))
    assert np.diagonal(mask, offset=nk - nq, axis1=2, axis2=3).all()


def test_bad_budget_rule_is_named():
    assert SelectionConfig.from_options({"density": 0.1, "budget": "proportional"}).budget == "proportional"
    assert SelectionConfig.from_options({"density": 0.1}).budget == "uniform"
    with pytest.raises(SelectionError, match="budget must be one of.*'even'"):
        SelectionConfig(density=0.1, budget="even")
    with pytest.raises(SelectionError, match="budget must be one of.*'even'"):
        SelectionConfig.from_options({"density": 0.1, "budget": "even"})
    with pytest.raises(EvalError, match="budget must be one of.*'even'"):
        EvalSettings(model="m", gates=None, data="d", seq_len=64, out="o", budget="even")


def test_row_budgets_bad_density_is_named():
    with pytest.raises(SelectionError, match="density must be in"):
        row_budgets(0.0, 8, 8)


def test_density_one_selects_every_visible_block_and_tail_options():
    mask = np.asarray(select_blocks(_scores(), SelectionConfig(density=1.0)))
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((NQ, NQ), bool)))
    mask = np.asarray(select_blocks(_scores(), SelectionConfig(density=0.1, keep_first=True, dense_last_rows=2)))
    assert mask[..., 0].all() and mask[..., -2:, :].sum() == 2 * (NQ - 1 + NQ)  # 2 heads, rows of 63 and 64 blocks


@pytest.mark.parametrize("nq,nk,causal", [(128, 128, True), (32, 32, True), (20, 56, True), (33, 33, False)])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("budget", ["uniform", "proportional"])
@pytest.mark.parametrize("m", [1, 3])
def test_dense_last_rows_come_out_of_the_same_budget(nq, nk, causal, density, budget, m):
    """dense_last_rows = m: the last m rows keep every block they see, and the other rows share the rest of
    floor(density x visible) (at least one block each), so the achieved density is still the target."""
    seen = np.asarray(causal_blocks(nq, nk, causal)).sum(-1)
    target = max(nq, int(np.floor(density * seen.sum() + 1e-9)))
    cfg = SelectionConfig(density=density, dense_last_rows=m, budget=budget)
    mask = np.asarray(select_blocks(_scores(nq=nq, nk=nk), cfg, causal=causal))
    kept = mask.sum(-1)
    np.testing.assert_array_equal(kept[..., nq - m :], np.broadcast_to(seen[nq - m :], kept[..., nq - m :].shape))
    rest = max(nq - m, target - int(seen[nq - m :].sum()))
    assert (kept[..., : nq - m].sum(-1) == rest).all()
    assert (kept[..., : nq - m] >= 1).all() and (kept <= seen).all()
    if rest > nq - m:  # the dense rows fit the budget: the achieved density is the target's, as without them
        assert (kept.sum(-1) == target).all()
    if budget == "uniform":  # no other row keeps more than it would without the dense rows
        uniform_without = row_k(density, nq, nk, causal, budget)
        assert np.all(np.asarray(row_k(density, nq, nk, causal, budget, m))[: nq - m] <= np.broadcast_to(uniform_without, (nq,))[: nq - m])


def test_threshold_and_key_padding():
    probs = jax.nn.softmax(jnp.where(causal_blocks(8, 8), _scores(nq=8, nk=8) * 10, -1e30), axis=-1)
    mask = np.asarray(select_blocks(probs, SelectionConfig(density=None, threshold=0.2)))
    want = (np.asarray(probs) > 0.2) | np.eye(8, dtype=bool)
    np.testing.assert_array_equal(mask, want & np.tril(np.ones((8, 8), bool)))
    valid = jnp.asarray([[True] * 5 + [False] * 3])
    mask = np.asarray(select_blocks(_scores(nq=8, nk=8), SelectionConfig(density=1.0), key_blocks_valid=valid))
    assert not mask[..., 5:].any()


@pytest.mark.parametrize("causal", [True, False])
def test_premasked_gate_logits_select_the_same_blocks(causal):
    """The seer path hands the gate's masked logits over with premasked=True (no second masking pass)."""
    from seerjax.gate import AttnGate, GateConfig

    gate = AttnGate(GateConfig(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, d_gate=32),
                    rngs=nnx.Rngs(0))
    q = jax.random.normal(jax.random.key(1), (2, 150, 4, 32))
    k = jax.random.normal(jax.random.key(2), (2, 200, 2, 32))
    lengths = jnp.asarray([200, 123]) if not causal else None
    if lengths is not None:
        q = k.repeat(2, axis=2)
    logits = gate(q, k, rope=None, lengths=lengths, causal=causal)
    nk = logits.shape[-1]
    valid = None if lengths is None else jnp.arange(nk)[None, :] * 16 < lengths[:, None]
    for density in (0.1, 0.3, 1.0):
        cfg = SelectionConfig(density=density, keep_first=density == 0.3)
        want = select_blocks(logits, cfg, causal=causal, key_blocks_valid=valid)
        got = select_blocks(logits, cfg, causal=causal, key_blocks_valid=valid, premasked=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bottom_right_alignment_for_shorter_queries():
    mask = np.asarray(select_blocks(_scores(nq=4, nk=8), SelectionConfig(density=1.0)))
    np.testing.assert_array_equal(mask[0, 0], np.arange(8)[None, :] <= np.arange(4)[:, None] + 4)


def test_selection_settings_errors():
    with pytest.raises(SelectionError, match="density"):
        SelectionConfig(density=1.5)
    with pytest.raises(SelectionError, match="exactly one"):
        SelectionConfig(density=0.1, threshold=0.01)
    with pytest.raises(SelectionError, match="threshold"):
        SelectionConfig(density=None, threshold=2.0)


@pytest.mark.parametrize("density", [0.5, 0.1])
def test_baseline_scores_select_causally_at_matched_density(density):
    key = jax.random.key(1)
    q = jax.random.normal(key, (1, 16 * 32, 4, 32))
    k = jax.random.normal(jax.random.key(2), (1, 16 * 32, 2, 32))
    sources = {
        "streaming": streaming_scores(1, 2, 32, 32),
        "quest": quest_scores(q, k, 16),
        "moba": moba_scores(q, k, 16),
        "vertical_slash": vertical_slash_scores(q, k, 16, 1 / np.sqrt(32)),
    }
    causal = np.tril(np.ones((32, 32), bool))
    for name, scores in sources.items():
        assert scores.shape == (1, 2, 32, 32), name
        mask = np.asarray(select_blocks(scores, SelectionConfig(density=density)))
        assert not (mask & ~causal).any(), name
        got = float(achieved_density(jnp.asarray(mask)).mean())
        assert abs(got - density) < 0.06, (name, got)
    stream = np.asarray(select_blocks(sources["streaming"], SelectionConfig(density=density)))
    rows = stream.sum(-1) >= 2  # the rows whose budget holds more than the diagonal keep the sink
    assert rows.any() and stream[..., 0][rows].all()


def test_oracle_recall_is_one_at_full_density_and_falls_monotonically():
    key = jax.random.key(0)
    q = jax.random.normal(key, (1, 256, 2, 32)) * 2
    k = jax.random.normal(jax.random.key(1), (1, 256, 2, 32)) * 2
    v = jax.random.normal(jax.random.key(2), (1, 256, 2, 32))
    _, pooled = attention_with_pooling(q, k, v, block_size=16, implementation="reference")
    mass = block_attention_mass(q, k, causal=True, block_size=16, sm_scale=1 / np.sqrt(32))
    np.testing.assert_allclose(np.asarray(mass.sum(-1)), 1.0, rtol=1e-5)
    recalls = []
    for d in (1.0, 0.75, 0.5, 0.25, 0.1, 0.05):
        mask = select_blocks(pooled, SelectionConfig(density=d))
        recalls.append(float(mass_recall(mask, mass)))
    assert recalls[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a >= b - 1e-6 for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[-1] < 0.9


def _tiny_model():
    cfg = ModelConfig(model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32)
    model = LlamaModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return model


@pytest.mark.parametrize("heads", ["query", "kv"])
def test_every_method_at_density_one_gives_dense_logits(heads):
    model = _tiny_model()
    attach_gates(model, gate_config_for_model(model.config, block_size=16, d_gate=32, heads=heads))
    ids = jax.random.randint(jax.random.key(0), (2, 100), 0, 256)
    lengths = jnp.asarray([100, 70])
    with jax.default_matmul_precision("highest"):
        dense = model(ids, attention="reference", lengths=lengths)
        for method in sparse_attention.SPARSE_METHODS:
            opts = {"density": 1.0, "implementation": "reference", "block_size": 16}
            logits, aux = model.forward(ids, attention=method, attention_config=opts, lengths=lengths)
            np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), atol=1e-4, err_msg=method)
            assert all(float(a["density"].min()) == 1.0 for a in aux), method
            sparse, _ = model.forward(ids, attention=method, attention_config={**opts, "density": 0.1}, lengths=lengths)
            assert np.isfinite(np.asarray(sparse)).all(), method


@pytest.mark.parametrize("method", ["seer", "streaming"])
def test_decode_tokens_is_a_sparse_prefill_of_the_prompt_then_dense_decoding(method):
    """decode_tokens = n: the prompt's logits are exactly those of a sparse prefill of the prompt alone (its gate
    never sees the answer), the last n rows differ from the all-sparse run, and at density 1.0 all is dense."""
    model = _tiny_model()
    attach_gates(model, gate_config_for_model(model.config, block_size=16, d_gate=32, heads="query"))
    ids = jax.random.randint(jax.random.key(3), (1, 120), 0, 256)
    opts = {"density": 0.1, "implementation": "reference", "block_size": 16}
    n = 5
    with jax.default_matmul_precision("highest"):
        sparse = np.asarray(model.forward(ids, attention=method, attention_config=opts)[0])
        prefill = np.asarray(model.forward(ids[:, :-n], attention=method, attention_config=opts)[0])
        mixed, aux = model.forward(ids, attention=method, attention_config={**opts, "decode_tokens": n})
        dense = np.asarray(model(ids, attention="reference"))
        full = model.forward(ids, attention=method, attention_config={**opts, "density": 1.0, "decode_tokens": n})[0]
    mixed = np.asarray(mixed)
    np.testing.assert_allclose(mixed[:, :-n], prefill, rtol=1e-5, atol=1e-5)
    assert np.abs(mixed[:, -n:] - sparse[:, -n:]).max() > 1e-4  # the tail is no longer sparse ...
    assert np.abs(mixed[:, -n:] - dense[:, -n:]).max() > 1e-4  # ... but the sparse prefill still shapes it
    assert all(0 < float(a["density"].mean()) < 0.5 for a in aux)  # the prefill's density
    np.testing.assert_allclose(np.asarray(full), dense, atol=1e-4)
    for bad in (-1, 120, 2.5, True):
        with pytest.raises(ValueError, match=r"decode_tokens must be an int in \[0, q_len=120\)"):
            model.forward(ids, attention=method, attention_config={**opts, "decode_tokens": bad})
    with pytest.raises(ValueError, match="decode_tokens .* needs lengths=None"):
        model.forward(ids, attention=method, attention_config={**opts, "decode_tokens": 2}, lengths=jnp.asarray([100]))


def test_decode_tokens_tail_is_dense_attention_over_the_same_keys():
    """One attention call: rows [T-n, T) equal reference attention of those rows over all keys; rows before equal
    the method on the first T-n rows alone."""
    from seerjax.attention import AttentionInputs, get_attention, reference_attention

    b, t, hq, hkv, d, n = 1, 96, 4, 2, 32, 3
    q = jax.random.normal(jax.random.key(0), (b, t, hq, d))
    k = jax.random.normal(jax.random.key(1), (b, t, hkv, d))
    v = jax.random.normal(jax.random.key(2), (b, t, hkv, d))
    pos = jnp.arange(t)[None]
    opts = {"density": 0.1, "implementation": "reference", "block_size": 16}
    fn = get_attention("streaming")
    with jax.default_matmul_precision("highest"):
        mixed = np.asarray(fn(AttentionInputs(q, k, v, q, k, pos, None, 0, config={**opts, "decode_tokens": n})).out)
        p = t - n
        head = np.asarray(fn(AttentionInputs(q[:, :p], k[:, :p], v[:, :p], q[:, :p], k[:, :p], pos[:, :p], None, 0,
                                             config=opts)).out)
        tail = np.asarray(reference_attention(AttentionInputs(q[:, p:], k, v, q[:, p:], k, pos[:, p:], None, 0)).out)
    np.testing.assert_array_equal(mixed[:, :p], head)
    np.testing.assert_allclose(mixed[:, p:], tail, rtol=1e-5, atol=1e-6)


def test_seer_without_gates_is_a_clear_error():
    model = _tiny_model()
    with pytest.raises(ValueError, match="needs AttnGates"):
        model(jnp.zeros((1, 32), jnp.int32), attention="seer")


def test_eval_settings_errors():
    with pytest.raises(EvalError, match="unknown methods"):
        EvalSettings(model="m", gates="g", data="d", seq_len=128, out="o", methods=("seer", "bogus"))
    with pytest.raises(EvalError, match="densities"):
        EvalSettings(model="m", gates="g", data="d", seq_len=128, out="o", densities=(0.0,))
    with pytest.raises(EvalError, match="needs --gates"):
        EvalSettings(model="m", gates=None, data="d", seq_len=128, out="o")
    with pytest.raises(EvalError, match="shorter than one block"):
        EvalSettings(model="m", gates="g", data="d", seq_len=16, out="o")
    with pytest.raises(EvalError, match="dense_last_rows"):
        EvalSettings(model="m", gates="g", data="d", seq_len=128, out="o", dense_last_rows=-1)
    with pytest.raises(EvalError, match="recall_sequences=3 exceeds num_sequences=2"):
        EvalSettings(model="m", gates="g", data="d", seq_len=128, out="o", num_sequences=2, recall_sequences=3)
    with pytest.raises(EvalError, match="recall_sequences must be positive, got 0"):
        EvalSettings(model="m", gates="g", data="d", seq_len=128, out="o", recall_sequences=0)


def test_recall_is_the_mean_over_the_recall_sequences():
    """--recall-sequences N: recall (and its ceiling) average over the first N sequences, each measured alone."""
    from seerjax.cli import build_parser
    from seerjax.eval.harness import _recall, recall_ceiling

    args = build_parser()[0].parse_args(["eval", "--model", "m", "--data", "d", "--seq-len", "64", "--out", "o",
                                         "--recall-sequences", "4"])
    assert args.recall_sequences == 4
    model = _tiny_model()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 64, size=64).astype(np.int32) for _ in range(2)]
    opts = {"density": 0.25, "block_size": 16, "implementation": "reference"}
    each = [_recall(model, "oracle", opts, [s], 16) for s in seqs]
    assert each[0] != each[1]
    np.testing.assert_allclose(_recall(model, "oracle", opts, seqs, 16), np.mean(each), rtol=1e-6)
    ceilings = [recall_ceiling(model, opts, [s], 16) for s in seqs]
    np.testing.assert_allclose(recall_ceiling(model, opts, seqs, 16), np.mean(ceilings), rtol=1e-6)


def test_eval_cli_bad_flags_exit_with_a_message(tmp_path):
    p = subprocess.run([sys.executable, "-m", "seerjax", "eval", "--model", "m", "--data", "d", "--seq-len", "128",
                        "--out", str(tmp_path), "--methods", "seer,nope", "--gates", "g"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "unknown methods ['nope']" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "seerjax", "eval", "--model", "m", "--data", "d", "--seq-len", "128",
                        "--out", str(tmp_path), "--densities", "0.5,abc"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "comma-separated numbers" in p.stderr


def test_oracle_kv_reads_one_mask_per_kv_head_picked_from_the_groups_max_pooled_map():
    """oracle_kv: the bound for KV-head gates. Its layer-0 mask has one row of blocks per KV head, and it is the TopK
    of the group's max-pooled maps max-ed over the group's query heads (what KV-head gates are distilled to)."""
    model = _tiny_model()  # 4 query heads, 2 KV heads
    ids = jax.random.randint(jax.random.key(5), (1, 128), 0, 256)
    opts = {"density": 0.25, "implementation": "reference", "block_size": 16}
    with jax.default_matmul_precision("highest"):
        _, pooled_aux = model.forward(ids, attention="pooled", attention_config={"block_size": 16, "implementation": "reference"})
        _, aux = model.forward(ids, attention="oracle_kv", attention_config={**opts, "return_mask": True})
        _, aux_q = model.forward(ids, attention="oracle", attention_config={**opts, "return_mask": True})
    pooled = pooled_aux[0]["pooled"]  # [1, 4, 8, 8]
    mask = np.asarray(aux[0]["mask"])
    assert mask.shape == (1, 2, 8, 8) and np.asarray(aux_q[0]["mask"]).shape == (1, 4, 8, 8)
    by_group = pooled.reshape(1, 2, 2, 8, 8).max(axis=2)
    np.testing.assert_array_equal(mask, np.asarray(select_blocks(by_group, SelectionConfig(density=0.25), causal=True)))
    # the same per-row budget as the per-query-head oracle
    assert float(aux[0]["density"].mean()) == pytest.approx(float(aux_q[0]["density"].mean()), abs=0.05)
