"""Multi-tenant training: several adapters trained together in one mixed stream.

Reference: each adapter trained alone on its own examples, with the same optimizer
(LoRA+ over AdamW with weight decay), fp32. Adam is elementwise, so the stacked run
gives the same adapters when each adapter's gradient is its own loss's: the gradients
agree to fp32 rounding (2e-7 of the largest entry, measured over seeds 0-2; asserted at
1e-5), and after four Adam steps the adapters agree to 5e-5 of the distance they moved
(Adam's m / sqrt(v) amplifies rounding in near-zero entries; asserted at 1e-3).
"""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import optax

import jlora
from conftest import randomize

CFG = llama.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2
)
SETTINGS = [dict(rank=2, alpha=4.0), dict(rank=8, alpha=8.0), dict(rank=4, alpha=2.0, rslora=True)]
N, PER, STEPS = len(SETTINGS), 2, 4


def _token_loss(logits, targets):
    """Mean next-token loss of each example, ``(batch,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=-1)


def _setup(key):
    model, params = llama.Llama(CFG), llama.init_params(CFG, key)
    ads = [
        randomize(
            jlora.init(
                jax.random.fold_in(key, i),
                params,
                jlora.LoraConfig(targets=("q_proj", "v_proj", "down_proj"), **s),
            ),
            jax.random.fold_in(key, i),
            0.05,
        )
        for i, s in enumerate(SETTINGS)
    ]
    data = jax.random.randint(key, (STEPS, N * PER, 9), 0, CFG.vocab_size)
    return model, params, ads, data


def test_adapters_trained_together_equal_each_trained_alone(key, tmp_path):
    model, params, ads, data = _setup(key)
    tx = jlora.loraplus(optax.adamw, learning_rate=1e-2, ratio=4.0, weight_decay=0.01)
    ids = jnp.tile(jnp.arange(N), PER)  # examples interleaved: 0, 1, 2, 0, 1, 2

    def mixed_loss(stacked, batch):
        logits = jlora.apply(model.apply)(params, stacked, batch[:, :-1], adapter_ids=ids)
        per = _token_loss(logits, batch[:, 1:])
        return sum(jnp.mean(per[i::N]) for i in range(N))  # each adapter's own mean

    def alone_loss(ad, batch):
        return jnp.mean(
            _token_loss(jlora.apply(model.apply)(params, ad, batch[:, :-1]), batch[:, 1:])
        )

    def step(loss):
        @jax.jit
        def run(ad, state, batch):
            grads = jax.grad(loss)(ad, batch)
            updates, state = tx.update(grads, state, ad)
            return optax.apply_updates(ad, updates), state

        return run

    stacked = jlora.stack(ads)
    assert len(jax.tree.leaves(stacked)) == 2 * 3 * 1  # a and b only: no scale leaf trains
    grads = jlora.unstack(jax.grad(mixed_loss)(stacked, data[0]))
    for i, ad in enumerate(ads):
        for got, want in zip(
            jax.tree.leaves(grads[i]), jax.tree.leaves(jax.grad(alone_loss)(ad, data[0][i::N]))
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    state = tx.init(stacked)
    run_mixed = step(mixed_loss)
    for batch in data:
        stacked, state = run_mixed(stacked, state, batch)
    run_alone = step(alone_loss)
    together = jlora.unstack(stacked)
    for i, ad in enumerate(ads):
        one_state = tx.init(ad)
        for batch in data:
            ad, one_state = run_alone(ad, one_state, batch[i::N])
        assert jax.tree.structure(together[i]) == jax.tree.structure(ad)
        for got, want, start in zip(
            jax.tree.leaves(together[i]), jax.tree.leaves(ad), jax.tree.leaves(ads[i])
        ):
            moved = float(jnp.abs(want - start).max())
            assert moved > 1e-3  # training did change every factor
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * moved)
    ckpt = tmp_path / "ckpt"
    jlora.save_checkpoint(ckpt, STEPS, {"adapter": stacked, "opt": state})
    back, meta = jlora.restore_checkpoint(ckpt, {"adapter": stacked, "opt": state})
    assert meta["step"] == STEPS
    assert jax.tree.structure(back) == jax.tree.structure({"adapter": stacked, "opt": state})
    for got, want in zip(
        jax.tree.leaves(back), jax.tree.leaves({"adapter": stacked, "opt": state})
    ):
        np.testing.assert_array_equal(got, want)


def test_unstack_inverts_stack_and_groups_stacked_factors_for_loraplus(key):
    _, _, ads, _ = _setup(key)
    stacked = jlora.stack(ads)
    for one, back in zip(ads, jlora.unstack(stacked)):
        assert jax.tree.structure(one) == jax.tree.structure(back)
        for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(back)):
            np.testing.assert_array_equal(x, y)
    labels = jlora._src.optim.labels(stacked)
    node = labels["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert (node.a, node.b) == ("a", "b")
