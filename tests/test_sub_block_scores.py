"""Sub-block block scores: the Pallas kernel (interpret mode here, compiled on GPU) against the XLA version and a
NumPy loop; gradients through its custom VJP; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seerjax.kernels.sub_block_scores import SubBlockScoreError, sub_block_scores, sub_block_scores_xla


def _numpy_scores(qg, kg, *, t, s, sq, sk, mq, mk, lengths, causal):
    """Each block's max over allowed sub-block pairs, by explicit loops over blocks."""
    qg, kg = np.asarray(qg, np.float64), np.asarray(kg, np.float64)
    b, nqm, h, _ = qg.shape
    kg = np.repeat(kg, h // kg.shape[2], axis=2)
    nq, nk = nqm // mq, kg.shape[1] // mk
    out = np.zeros((b, h, nq, nk))
    for bb in range(b):
        q_len = t if lengths is None else lengths[bb]
        k_len = s if lengths is None else lengths[bb]
        for i in range(nq):
            for j in range(nk):
                best = -np.inf
                for a in range(mq):
                    for c in range(mk):
                        qf, kf = (i * mq + a) * sq, (j * mk + c) * sk
                        ok = qf < q_len and kf < k_len and (not causal or kf <= min(qf + sq - 1, t - 1) + (s - t))
                        if ok:
                            best = np.maximum(best, np.einsum("hd,hd->h", qg[bb, i * mq + a], kg[bb, j * mk + c]))
                out[bb, :, i, j] = np.where(np.isfinite(best), best, 0.0)
    return out


CASES = [  # t, s, bs, mq, mk, heads, kv heads, lengths, causal
    (64, 64, 16, 4, 4, 4, 2, None, True),
    (45, 45, 16, 2, 8, 2, 2, None, True),
    (48, 48, 16, 4, 2, 4, 1, (48, 27), True),
    (32, 80, 16, 4, 4, 2, 2, None, True),  # fewer queries than keys: bottom-right aligned
    (40, 40, 8 * 4, 8, 4, 2, 2, None, False),
    (64, 64, 16, 1, 4, 2, 1, None, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_interpret_kernel_and_xla_match_a_numpy_loop(case):
    t, s, bs, mq, mk, h, hk, lengths, causal = case
    sq, sk = bs // mq, bs // mk
    nq, nk = -(-t // bs), -(-s // bs)
    rng = np.random.default_rng(sum(case[:6]))
    qg = rng.normal(size=(len(lengths or (0,)), nq * mq, h, 16)).astype(np.float32)
    kg = rng.normal(size=(qg.shape[0], nk * mk, hk, 16)).astype(np.float32)
    kw = dict(t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, causal=causal)
    lens = None if lengths is None else jnp.asarray(lengths)
    want = _numpy_scores(qg, kg, lengths=lengths, **kw)
    xla = np.asarray(sub_block_scores_xla(jnp.asarray(qg), jnp.asarray(kg), lengths=lens, **kw))
    kern = np.asarray(sub_block_scores(jnp.asarray(qg), jnp.asarray(kg), lengths=lens, implementation="pallas_interpret", **kw))
    np.testing.assert_allclose(xla, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kern, want, rtol=1e-5, atol=1e-5)


def test_bf16_kernel_matches_xla_and_gradients_flow_through_the_xla_backward():
    rng = np.random.default_rng(3)
    qg = jnp.asarray(rng.normal(size=(1, 4 * 4, 4, 32)), jnp.bfloat16)
    kg = jnp.asarray(rng.normal(size=(1, 4 * 4, 2, 32)), jnp.bfloat16)
    kw = dict(t=61, s=61, sq=4, sk=4, mq=4, mk=4, lengths=jnp.asarray([50]))
    kern = sub_block_scores(qg, kg, implementation="pallas_interpret", **kw)
    xla = sub_block_scores(qg, kg, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(kern), np.asarray(xla), rtol=1e-2, atol=1e-2)
    weights = jnp.asarray(rng.normal(size=xla.shape), jnp.float32)

    def loss(impl):
        return lambda q, k: jnp.sum(weights * sub_block_scores(q, k, implementation=impl, **kw))

    q32, k32 = qg.astype(jnp.float32), kg.astype(jnp.float32)
    g_kern = jax.grad(loss("pallas_interpret"), argnums=(0, 1))(q32, k32)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1))(q32, k32)
    for a, b in zip(g_kern, g_xla):
        assert np.abs(np.asarray(b)).sum() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    q = jnp.zeros((1, 8, 4, 16))
    k = jnp.zeros((1, 8, 3, 16))
    kw = dict(t=32, s=32, sq=4, sk=4, mq=4, mk=4)
    with pytest.raises(SubBlockScoreError, match="heads must divide"):
        sub_block_scores(q, k, **kw)
    with pytest.raises(SubBlockScoreError, match="multiples of mq=3"):
        sub_block_scores(q, jnp.zeros((1, 8, 2, 16)), **{**kw, "mq": 3})
    with pytest.raises(SubBlockScoreError, match="t=40"):
        sub_block_scores(q, jnp.zeros((1, 8, 2, 16)), **{**kw, "t": 40, "s": 40})
    with pytest.raises(SubBlockScoreError, match="implementation must be"):
        sub_block_scores(q, jnp.zeros((1, 8, 2, 16)), implementation="cuda", **kw)


_ON_GPU = any(d.platform == "gpu" for d in jax.devices())


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("t,lengths,grain", [(16384, None, (8, 8)), (5000, (5000, 3001), (4, 4)), (4096, None, (1, 8))])
def test_compiled_kernel_matches_xla(t, lengths, grain):
    """The study's shapes: 8 query / 2 KV gate heads, d 128, bf16, block 64."""
    mq, mk = grain
    b = len(lengths or (0,))
    n = -(-t // 64)
    rng = np.random.default_rng(t)
    qg = jnp.asarray(rng.normal(size=(b, n * mq, 8, 128)) / 8, jnp.bfloat16)
    kg = jnp.asarray(rng.normal(size=(b, n * mk, 2, 128)), jnp.bfloat16)
    kw = dict(t=t, s=t, sq=64 // mq, sk=64 // mk, mq=mq, mk=mk, lengths=None if lengths is None else jnp.asarray(lengths))
    got = jax.jit(lambda q, k: sub_block_scores(q, k, implementation="pallas", **kw))(qg, kg)
    want = jax.jit(lambda q, k: sub_block_scores_xla(q, k, **kw))(qg, kg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)
