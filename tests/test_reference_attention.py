"""The jnp reference attention: exact against a float64 NumPy softmax, padding rows zero, finite gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seerjax.attention import AttentionInputs, reference_attention


def _inputs(q, k, v, *, causal, lengths):
    return AttentionInputs(q=q, k=k, v=v, q_nope=q, k_nope=k, positions=None, lengths=lengths, layer=0, causal=causal,
                           gate=None, config={}, model_config=None)


def _numpy(q, k, v, causal, lengths):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, t, hq, d))
    for bi in range(b):
        n = s if lengths is None else int(lengths[bi])
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(min(t, n)):
                last = min(n, i + (s - t) + 1) if causal else n
                logits = q[bi, i, h] @ k[bi, :last, kh].T / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, :last, kh]
    return out


@pytest.mark.parametrize("causal,lengths,t", [(True, None, 40), (True, (40, 23), 40), (False, (17, 40), 40), (True, None, 24)])
def test_matches_float64_softmax_and_zeroes_padding_rows(causal, lengths, t):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, t, 4, 16)) * 2
    k = jax.random.normal(keys[1], (2, 40, 2, 16)) * 2
    v = jax.random.normal(keys[2], (2, 40, 2, 16))
    lens = None if lengths is None else jnp.asarray(lengths)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(reference_attention(_inputs(q, k, v, causal=causal, lengths=lens)).out)
    np.testing.assert_allclose(out, _numpy(q, k, v, causal, lengths), atol=2e-5, rtol=2e-5)
    if lengths is not None:
        for bi, n in enumerate(lengths):
            assert not out[bi, n:].any()  # padding rows are exact zeros


def test_gradients_are_finite_and_zero_through_padding_rows():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (1, 32, 2, 8)) for kk in keys)
    lengths = jnp.asarray([20])

    def loss(q, k, v):
        return jnp.sum(reference_attention(_inputs(q, k, v, causal=True, lengths=lengths)).out ** 2)

    gq, gk, gv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in (gq, gk, gv):
        assert np.isfinite(np.asarray(g)).all()
        assert not np.asarray(g)[0, 20:].any()  # padded queries and keys get no gradient
