"""Common mistakes that used to pass silently, and errors that pointed to the wrong fix.

Each mistake is either computed right (checked against the closed form ``x W + s x A B``)
or refused with a message that names the fix.
"""

import json
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

KEY = jax.random.key(0)


def _trained(ad, shift=0.5):
    """``ad`` with B moved off zero (a fresh adapter is exactly the base)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x + shift if jax.tree_util.keystr(kp).endswith(".b") else x, ad
    )


def _model():
    k = jax.random.split(KEY, 2)
    return {
        "layers": {
            "q_proj": {"kernel": jax.random.normal(k[0], (8, 8))},
            "v_proj": {"kernel": jax.random.normal(k[1], (8, 8))},
        }
    }


def _fn(p, x):
    layers = p["layers"]
    return x @ layers["q_proj"]["kernel"] + x @ layers["v_proj"]["kernel"]


# --- 1. a typo among several targets --------------------------------------------------------


def test_a_typo_among_targets_is_refused_with_the_nearest_names():
    with pytest.raises(jlora.LoraError, match=r"'q_porj' matched no parameter.*'q_proj'"):
        jlora.init(KEY, _model(), jlora.LoraConfig(targets=("q_porj", "v_proj")))
    with pytest.raises(jlora.LoraError, match=r"exclude=.*'v_prj' matched no parameter"):
        jlora.init(KEY, _model(), jlora.LoraConfig(targets=("q_proj",), exclude=("v_prj",)))
    # a regex is left as it is: the user's alternation may name optional modules
    ad = jlora.init(KEY, _model(), jlora.LoraConfig(targets="q_porj|v_proj"))
    assert ad["layers"]["q_proj"]["kernel"] is None
    assert ad["layers"]["v_proj"]["kernel"] is not None


# --- 2. dropout with no lora_rng ------------------------------------------------------------


def _closed_form(p, ad, x):
    out = _fn(p, x)
    for name in ("q_proj", "v_proj"):
        n = ad["layers"][name]["kernel"]
        if n is not None:
            out = out + n.scale * (x @ n.a) @ n.b
    return out


def test_dropout_needs_lora_rng_or_deterministic():
    p, x = _model(), jax.random.normal(jax.random.key(1), (4, 8))
    ad = _trained(jlora.init(KEY, p, jlora.LoraConfig(targets=("q_proj",), dropout=0.5)))
    f = jlora.apply(_fn)
    with pytest.raises(jlora.LoraError, match="dropout=0.5 but no lora_rng.*deterministic=True"):
        f(p, ad, x)
    want = _closed_form(p, ad, x)
    np.testing.assert_allclose(f(p, ad, x, deterministic=True), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(f, static_argnames="deterministic")(p, ad, x, deterministic=True),
        want,
        rtol=1e-5,
        atol=1e-5,
    )
    # deterministic=True wins over a key, as in Flax; without it the key drops inputs
    np.testing.assert_allclose(
        f(p, ad, x, lora_rng=KEY, deterministic=True), want, rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(f(p, ad, x, lora_rng=KEY), want, atol=1e-3)
    with pytest.raises(TypeError, match="static_argnames='deterministic'"):
        jax.jit(f)(p, ad, x, deterministic=True)
    no_dropout = _trained(jlora.init(KEY, p, jlora.LoraConfig(targets=("q_proj",))))
    np.testing.assert_allclose(
        f(p, no_dropout, x), _closed_form(p, no_dropout, x), rtol=1e-5, atol=1e-5
    )  # nothing to decide: no error


def test_deterministic_reaches_a_model_that_takes_it():
    p, x = _model(), jnp.ones((2, 8))
    ad = jlora.init(KEY, p, jlora.LoraConfig(targets=("q_proj",), dropout=0.1))
    seen = []

    def fn(params, x, deterministic=False):
        seen.append(deterministic)
        return _fn(params, x)

    jlora.apply(fn)(p, ad, x, deterministic=True)
    assert seen == [True]
    jlora.apply(lambda params, x, **kw: fn(params, x, **kw))(p, ad, x, deterministic=True)
    assert seen == [True, False]  # a bare **kwargs does not get it
    jlora.apply(_fn)(p, ad, x, deterministic=True)  # _fn takes no such keyword: not passed

    class Dropping(nn.Module):  # Flax Linen: model.apply's **kwargs reach __call__
        @nn.compact
        def __call__(self, x, deterministic=False):
            seen.append(deterministic)
            return nn.Dense(4, name="q_proj")(x)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="q_proj")(x)

    for model in (Dropping(), Plain()):
        variables = model.init(KEY, x)
        lin = jlora.init(KEY, variables, jlora.LoraConfig(rank=2, targets=("q_proj",), dropout=0.1))
        jlora.apply(model.apply)(variables, lin, x, deterministic=True)
    assert seen[-1] is True and len(seen) == 4  # init's call, then apply's


# --- 3. a bf16 base gives float32 factors ---------------------------------------------------


def test_a_low_precision_base_gets_float32_factors():
    p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), _model())
    x = jax.random.normal(jax.random.key(1), (4, 8)).astype(jnp.bfloat16)
    cfg = jlora.LoraConfig(targets=("q_proj",))
    ad = _trained(jlora.init(KEY, p, cfg))
    node = ad["layers"]["q_proj"]["kernel"]
    assert node.a.dtype == node.b.dtype == jnp.float32
    state = optax.adam(1e-3).init(ad)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
    y = jax.jit(jlora.apply(_fn))(p, ad, x)
    assert y.dtype == jnp.bfloat16  # the model still computes in the base's dtype
    want = _closed_form(jax.tree.map(lambda w: w.astype(jnp.float32), p), ad, x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=5e-2)
    old = jlora.init(KEY, p, jlora.LoraConfig(targets=("q_proj",), dtype="base"))
    assert old["layers"]["q_proj"]["kernel"].a.dtype == jnp.bfloat16  # the old default
    f32 = jlora.init(KEY, _model(), cfg)
    assert f32["layers"]["q_proj"]["kernel"].a.dtype == jnp.float32
    f64_cfg = jlora.LoraConfig(targets=("q_proj",), dtype=jnp.float64)
    assert jlora.LoraConfig(targets=("q_proj",)).dtype is None and f64_cfg.dtype == jnp.float64


# --- 4. out-of-range adapter_ids under jit --------------------------------------------------


@pytest.mark.parametrize("mixed", ["gather", "grouped", "onehot"])
def test_out_of_range_adapter_ids_give_nan_rows_under_jit(mixed):
    p = {"w": jax.random.normal(KEY, (8, 6))}
    fn = lambda p, x: x @ p["w"]
    cfg = jlora.LoraConfig(rank=2, targets=("w",))
    ads = [_trained(jlora.init(jax.random.key(i), p, cfg), 0.1 * (i + 1)) for i in range(2)]
    x = jax.random.normal(jax.random.key(3), (5, 8))
    ids = jnp.array([0, 5, -7, 1, -1])
    serve = jax.jit(lambda ad, x, ids: jlora.apply(fn, mixed=mixed)(p, ad, x, adapter_ids=ids))
    y = np.asarray(serve(jlora.stack(ads), x, ids))
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()  # 5 and -7: no adapter's output
    for row, ad in ((0, ads[0]), (3, ads[1])):
        np.testing.assert_allclose(
            y[row],
            x[row] @ p["w"] + ad["w"].scale * (x[row] @ ad["w"].a) @ ad["w"].b,
            rtol=1e-5,
            atol=1e-5,
        )
    np.testing.assert_allclose(y[4], x[4] @ p["w"], rtol=1e-5, atol=1e-5)
    with pytest.raises(jlora.LoraError, match=r"adapter_ids \[5, -7\] are out of range"):
        jlora.apply(fn)(p, jlora.stack(ads), x, adapter_ids=np.asarray(ids))  # concrete


def test_slots_batch_checks_names_on_the_host():
    p = {"w": jnp.ones((8, 6))}
    ad = jlora.init(KEY, p, jlora.LoraConfig(rank=2, targets=("w",)))
    slots = jlora.Slots(p, ad, n=2)
    slots.load("a", ad)
    tree, ids = slots.batch(["a", None, "a"])
    assert ids.tolist() == [0, -1, 0]
    with pytest.raises(jlora.LoraError, match="'b' was never loaded"):
        slots.batch(["a", "b"])


# --- 5. a weight used transposed by an adapter made without fn ------------------------------


def test_a_transposed_use_without_fn_warns_and_peft_save_refuses(tmp_path):
    p = {"proj": {"weight": jax.random.normal(KEY, (8, 8))}}  # torch / Equinox: (out, in)
    fn = lambda p, x: x @ p["proj"]["weight"].T
    x = jnp.ones((2, 8))
    cfg = jlora.LoraConfig(rank=2, targets=("proj",))
    guessed = jlora.init(KEY, p, cfg)
    with pytest.warns(UserWarning, match=r"'proj/weight'.*pass fn to init"):
        jlora.apply(fn)(p, guessed, x)
    with pytest.raises(jlora.LoraError, match=r"'proj/weight'.*made without fn.*Pass fn"):
        jlora.peft.save(str(tmp_path / "guessed"), guessed)
    learned = jlora.init(KEY, p, cfg, fn, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.apply(fn)(p, learned, x)
    jlora.peft.save(str(tmp_path / "learned"), learned)
    # a Flax kernel (in, out) without fn saves as before
    flax = jlora.init(KEY, {"proj": {"kernel": jnp.ones((8, 8))}}, cfg)
    jlora.peft.save(str(tmp_path / "flax"), flax)


# --- errors that point the right way --------------------------------------------------------


def test_peft_field_names_in_lora_config_name_jloras():
    with pytest.raises(
        TypeError,
        match=r"r= \(PEFT's name for rank=\).*lora_alpha= \(PEFT's "
        r"name for alpha=\).*target_modules= \(PEFT's name for targets=\).*"
        r"jlora.peft.load",
    ):
        jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unknown fields ranks="):
        jlora.LoraConfig(ranks=8)


def test_init_with_swapped_arguments_names_the_order():
    cfg = jlora.LoraConfig(targets=("q_proj",))
    with pytest.raises(jlora.LoraError, match=r"wrong order: the random key comes first"):
        jlora.init(_model(), KEY, cfg)
    with pytest.raises(jlora.LoraError, match=r"wrong order"):
        jlora.init(_model(), jax.random.PRNGKey(0), cfg)  # a legacy key too
    assert jlora.init(jax.random.PRNGKey(0), _model(), cfg)["layers"]["q_proj"]["kernel"]


def test_a_peft_file_for_another_model_size_says_so(tmp_path):
    small = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    big = {"q_proj": {"kernel": jnp.ones((16, 16))}}
    ad = jlora.init(KEY, small, jlora.LoraConfig(rank=2, targets=("q_proj",)))
    jlora.peft.save(str(tmp_path), ad)
    with pytest.raises(jlora.LoraError, match="factors are for a 8 x 8 weight.*another size"):
        jlora.peft.load(str(tmp_path), big)


def test_restore_with_another_structure_shows_the_first_difference(tmp_path):
    ad = {"w": jnp.ones(3)}
    jlora.save_checkpoint(tmp_path, 1, {"adapter": ad, "opt": optax.adam(1e-3).init(ad)})
    other = {"adapter": ad, "opt": optax.sgd(1e-3, momentum=0.9).init(ad)}
    with pytest.raises(
        jlora.LoraError,
        match=r"another structure than like \(4 leaves against "
        r"2\): at leaf 1, the checkpoint has \['opt'\]\[0\].count",
    ):
        jlora.restore_checkpoint(tmp_path, other)
    resized = {"adapter": {"w": jnp.ones(4)}, "opt": optax.adam(1e-3).init({"w": jnp.ones(4)})}
    with pytest.raises(
        jlora.LoraError,
        match=r"\['adapter'\]\['w'\] has shape \[3\] in the "
        r"checkpoint but \[4\] in like",
    ):
        jlora.restore_checkpoint(tmp_path, resized)


def test_load_adapter_on_a_peft_directory_points_to_peft_load(tmp_path):
    p = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    jlora.peft.save(str(tmp_path), jlora.init(KEY, p, jlora.LoraConfig(targets=("q_proj",))))
    with pytest.raises(jlora.LoraError, match=r"PEFT adapter directory.*jlora.peft.load"):
        jlora.load_adapter(str(tmp_path), p)


def test_save_adapter_onto_a_file_is_a_lora_error_and_keeps_the_file(tmp_path):
    p = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    ad = jlora.init(KEY, p, jlora.LoraConfig(targets=("q_proj",)))
    target = tmp_path / "taken"
    target.write_text("keep me")
    for save in (
        lambda: jlora.save_adapter(target, ad),
        lambda: jlora.save_checkpoint(target, 1, ad),
    ):
        with pytest.raises(jlora.LoraError, match="is a file, not a directory"):
            save()
    assert target.read_text() == "keep me"


# --- foreign PEFT files ----------------------------------------------------------------------


def _peft_dir(tmp_path, name, **fields):
    """jlora's factors with the adapter_config.json real PEFT writes for ``fields``."""
    from peft import LoraConfig

    p = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    d = tmp_path / name
    jlora.peft.save(str(d), jlora.init(KEY, p, jlora.LoraConfig(rank=2, targets=("q_proj",))))
    LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj"], **fields).save_pretrained(str(d))
    return str(d), p


@pytest.mark.parametrize(
    "field",
    [
        "kasa_config",
        "arrow_config",
        "use_bdlora",
        "monteclora_config",
        "velora_config",
        "use_qalora",
    ],
)
def test_peft_variants_jlora_does_not_implement_are_refused_by_name(tmp_path, field):
    from peft.tuners.lora import config as peft_lora

    value = {
        "kasa_config": lambda: peft_lora.KasaConfig(),
        "arrow_config": lambda: peft_lora.ArrowConfig(),
        "use_bdlora": lambda: peft_lora.BdLoraConfig(),
        "monteclora_config": lambda: peft_lora.MontecloraConfig(),
        "velora_config": lambda: peft_lora.VeloraConfig(),
        "use_qalora": lambda: True,
    }[field]()
    d, p = _peft_dir(tmp_path, field, **{field: value})
    with pytest.raises(jlora.LoraError, match=rf"unsupported PEFT config fields: {field}="):
        jlora.peft.load(d, p)


def test_a_field_from_a_later_peft_is_refused_and_peft_defaults_load(tmp_path):
    d, p = _peft_dir(tmp_path, "plain")
    assert jlora.peft.load(d, p)["q_proj"]["kernel"].rank == 2  # every default field passes
    config = json.load(open(os.path.join(d, "adapter_config.json")))
    json.dump({**config, "use_newfangled": True}, open(os.path.join(d, "adapter_config.json"), "w"))
    with pytest.raises(
        jlora.LoraError,
        match=r"use_newfangled=True \(a field jlora does not "
        "know",
    ):
        jlora.peft.load(d, p)
    json.dump({**config, "use_newfangled": None}, open(os.path.join(d, "adapter_config.json"), "w"))
    assert jlora.peft.load(d, p)["q_proj"]["kernel"].rank == 2  # null is PEFT's "unset"
