"""The bad-input catalogue: every user mistake ends in a clear error, and nothing is modified.

Each case builds a call that must raise ``ValueError`` or ``TypeError`` (``jlora.LoraError``
is a ``ValueError``) whose message names the offending parameter path or argument
(``where``) and says how to fix it (``fix``); afterwards every array argument holds
the same bytes as before and every directory argument the same files.
"""

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from conftest import randomize

Q = "layers_0/q_proj/kernel"


def base():
    k = jax.random.key(0)
    return {
        "layers_0": {
            "q_proj": {"kernel": jax.random.normal(k, (8, 12)), "bias": jnp.zeros((12,))},
            "v_proj": {"kernel": jax.random.normal(jax.random.fold_in(k, 1), (8, 12))},
        },
        "embed": {"embedding": jax.random.normal(jax.random.fold_in(k, 2), (20, 8))},
        "temperature": jnp.ones(()),
        "step": jnp.zeros((3, 4), jnp.int32),
    }


def model(p, x):
    h = p["embed"]["embedding"][x]
    return h @ p["layers_0"]["q_proj"]["kernel"] + h @ p["layers_0"]["v_proj"]["kernel"]


CFG = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))


def adapter(params=None, cfg=CFG, seed=1):
    params = base() if params is None else params
    return randomize(jlora.init(jax.random.key(seed), params, cfg), jax.random.key(seed + 1))


def edit(ad, path, **changes):
    """A copy of ``ad`` with the node at ``path`` replaced (``dataclasses.replace``)."""
    a, b, leaf = path.split("/")
    node = dataclasses.replace(ad[a][b][leaf], **changes)
    return {**ad, a: {**ad[a], b: {**ad[a][b], leaf: node}}}


def stacked_call(ids):
    st = jlora.stack([adapter(seed=1), adapter(seed=5)])
    return jlora.apply(model), (base(), st, jnp.zeros((2, 3), jnp.int32)), dict(adapter_ids=ids)


def saved(tmp, name="ad"):
    path = str(tmp / name)
    jlora.save_adapter(path, adapter())
    return path


def peft_dir(tmp, **config):
    path = str(tmp / "peft")
    jlora.peft.save(path, adapter())
    if config:
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({**cfg, **config}, f)
    return path


def damage(path, how):
    """Truncate or overwrite the middle of the largest file under ``path``."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    big = max(files, key=os.path.getsize)
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(0)
            f.write(b"\xff" * min(size, 64))
    return path


def orbax_step_dir(tmp):
    path = str(tmp / "ckpt")
    jlora.save_checkpoint(path, 1, {"adapter": adapter()})
    return path


def nan_input():
    x = jnp.zeros((2, 3), jnp.int32)
    p = base()
    p = {**p, "embed": {"embedding": p["embed"]["embedding"].at[3, 1].set(jnp.nan)}}
    return jlora.apply(model, safe=True), (p, adapter(), x), {}


def overflow():
    node = adapter()["layers_0"]["q_proj"]["kernel"]
    big = edit(adapter(), Q, a=jnp.ones_like(node.a), b=jnp.full_like(node.b, 3e38))
    return jlora.merge, (base(), big), {}


def config(**kw):
    return lambda tmp: (jlora.LoraConfig, (), kw)


# (name, build(tmp) -> (callable, args, kwargs), words that must all be in the message;
# "{tmp}" stands for the test's temporary directory)
CASES = [
    ("rank 0", config(rank=0), ["rank=0", "positive integer"]),
    ("rank negative", config(rank=-4), ["rank=-4", "positive"]),
    ("rank not an integer", config(rank=2.5), ["rank=2.5", "integer"]),
    ("rank a bool", config(rank=True), ["rank=True", "integer"]),
    (
        "rank above min(in, out)",
        lambda t: (jlora.init, (jax.random.key(0), base(), jlora.LoraConfig(rank=9)), {}),
        [Q, "lower the rank"],
    ),
    ("alpha 0", config(alpha=0.0), ["alpha=0.0", "2*rank"]),
    ("alpha negative", config(alpha=-16), ["alpha=-16", "positive"]),
    ("alpha NaN", config(alpha=float("nan")), ["alpha=nan", "finite"]),
    ("dropout 1", config(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
    ("dropout negative", config(dropout=-0.1), ["dropout=-0.1", "0.05"]),
    (
        "invalid targets regex",
        lambda t: (jlora.LoraConfig, (), dict(targets="q_proj(")),
        ["targets='q_proj('", "valid regex"],
    ),
    ("empty targets", config(targets=()), ["targets=()", "q_proj"]),
    ("unknown init", config(init="xavier"), ["init='xavier'", "kaiming"]),
    ("unknown preset", lambda t: (jlora.LoraConfig.preset, ("fast",), {}), ["'fast'", "general"]),
    ("rank_pattern value 0", config(rank_pattern={"q": 0}), ["rank_pattern['q']=0", "positive"]),
    (
        "targets match nothing",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), jlora.LoraConfig(targets=("query",))),
            {},
        ),
        ["('query',)", "matched no parameter", Q],
    ),
    (
        "targets match a 1-D bias",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), jlora.LoraConfig(rank=2, targets="q_proj")),
            {},
        ),
        ["layers_0/q_proj/bias", "kernel"],
    ),
    (
        "targets match a scalar",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), jlora.LoraConfig(rank=1, targets="temp")),
            {},
        ),
        ["temperature", "kernel"],
    ),
    (
        "targets match an integer leaf",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), jlora.LoraConfig(rank=2, targets="step")),
            {},
        ),
        ["'step'", "int32", "floating"],
    ),
    (
        "rank_pattern key matches nothing",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), dataclasses.replace(CFG, rank_pattern={"o_proj": 2})),
            {},
        ),
        ["rank_pattern", "'o_proj'", Q],
    ),
    (
        "alpha_pattern key matches nothing",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), dataclasses.replace(CFG, alpha_pattern={"gate": 2.0})),
            {},
        ),
        ["alpha_pattern", "'gate'", Q],
    ),
    (
        "bf16 adapter made for an fp32 base",
        lambda t: (
            jlora.init,
            (jax.random.key(0), base(), dataclasses.replace(CFG, dtype=jnp.bfloat16)),
            {},
        ),
        [Q, "bfloat16", "float32", "dtype=None"],
    ),
    (
        "bf16 factors applied to an fp32 base",
        lambda t: (
            jlora.apply(model),
            (
                base(),
                jax.tree.map(lambda v: v.astype(jnp.bfloat16), adapter()),
                jnp.zeros((2, 3), jnp.int32),
            ),
            {},
        ),
        [Q, "bfloat16", "astype(jnp.float32)"],
    ),
    (
        "integer factors",
        lambda t: (
            jlora.check,
            (base(), jax.tree.map(lambda v: v.astype(jnp.int32), adapter())),
            {},
        ),
        [Q, "int32", "floating"],
    ),
    (
        "factor shapes that disagree with the rank",
        lambda t: (
            jlora.check,
            (base(), edit(adapter(), Q, a=adapter()["layers_0"]["q_proj"]["kernel"].a[:, :2])),
            {},
        ),
        [Q, "(8, 2)", "(8, 4)", "jlora.init"],
    ),
    (
        "adapter for params of another shape",
        lambda t: (
            jlora.apply(model),
            (
                base(),
                adapter(
                    jax.tree.map(
                        lambda v: (
                            jnp.zeros((v.shape[0] + 1,) + v.shape[1:], v.dtype)
                            if v.ndim == 2
                            else v
                        ),
                        base(),
                    )
                ),
                jnp.zeros((2, 3), jnp.int32),
            ),
            {},
        ),
        [Q, "(9, 12)", "(8, 12)", "jlora.init"],
    ),
    (
        "adapter for params of another structure",
        lambda t: (
            jlora.merge,
            ({"layers_0": {"v_proj": base()["layers_0"]["v_proj"]}}, adapter()),
            {},
        ),
        [Q, "another model", "layers_0/v_proj/kernel"],
    ),
    (
        "adapter that is not an adapter",
        lambda t: (
            jlora.check,
            (base(), {"layers_0": {"q_proj": {"kernel": jnp.zeros((8, 12))}}}),
            {},
        ),
        [Q, "Array", "jlora.init"],
    ),
    (
        "NaN in the adapter",
        lambda t: (
            jlora.check,
            (
                base(),
                edit(
                    adapter(),
                    Q,
                    b=adapter()["layers_0"]["q_proj"]["kernel"].b.at[0, 0].set(jnp.nan),
                ),
            ),
            {},
        ),
        [Q, ".b", "non-finite", "restore"],
    ),
    (
        "NaN in the inputs with safe=True",
        lambda t: nan_input(),
        ["embed/embedding", "non-finite", "safe=False"],
    ),
    (
        "adapter_ids out of range",
        lambda t: stacked_call(jnp.array([0, 2])),
        ["[2]", "out of range", "-1"],
    ),
    (
        "adapter_ids of the wrong length",
        lambda t: stacked_call(jnp.array([0, 1, 1])),
        ["3 adapter_ids", "example axis"],
    ),
    (
        "adapter_ids not integers",
        lambda t: stacked_call(jnp.array([0.0, 1.0])),
        ["adapter_ids", "float32", "integer"],
    ),
    (
        "stacking adapters of different targets",
        lambda t: (
            jlora.stack,
            ([adapter(), adapter(cfg=dataclasses.replace(CFG, targets=("q_proj",)))],),
            {},
        ),
        ["layers_0/v_proj/kernel", "different leaves"],
    ),
    (
        "combine weights of the wrong length",
        lambda t: (jlora.combine_adapters, ([adapter(), adapter(seed=3)], [1.0]), {}),
        ["2 adapters", "1 weights"],
    ),
    ("merging an adapter that overflows", lambda t: overflow(), [Q, "non-finite"]),
    (
        "quantizing an integer leaf",
        lambda t: (jlora.quantize, (base(), "step"), {}),
        ["'step'", "int32", "leave it out"],
    ),
    (
        "quantize block size odd",
        lambda t: (jlora.quantize, (base(),), dict(block_size=63)),
        ["block_size=63", "64"],
    ),
    (
        "LoRA+ ratio 0",
        lambda t: (jlora.loraplus, (optax.adamw, 1e-4), dict(ratio=0.0)),
        ["ratio=0.0", "16"],
    ),
    (
        "loading an adapter for another base",
        lambda t: (
            jlora.load_adapter,
            (
                saved(t),
                {
                    **base(),
                    "layers_0": {**base()["layers_0"], "q_proj": {"kernel": jnp.zeros((8, 16))}},
                },
            ),
            {},
        ),
        [Q, "(8, 16)", "another base"],
    ),
    (
        "loading a directory that is not an adapter",
        lambda t: (jlora.load_adapter, (str(t),), {}),
        ["{tmp}", "save_adapter"],
    ),
    (
        "loading a truncated adapter checkpoint",
        lambda t: (jlora.load_adapter, (damage(saved(t), "truncate"),), {}),
        ["ad", "corrupt", "save"],
    ),
    (
        "loading a corrupted adapter checkpoint",
        lambda t: (jlora.load_adapter, (damage(saved(t), "overwrite"),), {}),
        ["ad", "corrupt", "save"],
    ),
    (
        "restoring a truncated training checkpoint",
        lambda t: (
            jlora.restore_checkpoint,
            (damage(orbax_step_dir(t), "truncate"), {"adapter": adapter()}),
            {},
        ),
        ["ckpt", "corrupt", "save"],
    ),
    (
        "saving a training step that is already saved",
        lambda t: (jlora.save_checkpoint, (orbax_step_dir(t), 1, {"adapter": adapter(seed=9)}), {}),
        ["step 1 is already saved", "ckpt", "new step"],
    ),
    (
        "truncated PEFT safetensors",
        lambda t: (jlora.peft.load, (damage(peft_dir(t), "truncate"), base()), {}),
        ["adapter_model.safetensors", "truncated"],
    ),
    (
        "corrupted PEFT safetensors header",
        lambda t: (jlora.peft.load, (damage(peft_dir(t), "overwrite"), base()), {}),
        ["adapter_model.safetensors", "header"],
    ),
    (
        "PEFT config with unsupported fields",
        lambda t: (
            jlora.peft.load,
            (peft_dir(t, layer_replication=[[0, 1]], use_qalora=True), base()),
            {},
        ),
        ["layer_replication=[[0, 1]]", "use_qalora=True", "unsupported"],
    ),
    (
        "PEFT adapter for another base",
        lambda t: (
            jlora.peft.load,
            (
                peft_dir(t),
                {
                    **base(),
                    "layers_0": {**base()["layers_0"], "q_proj": {"kernel": jnp.zeros((8, 16))}},
                },
            ),
            {},
        ),
        [Q, "(8, 16)"],
    ),
]


def _snapshot(value):
    """Bytes of every array and file reachable from an argument."""
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
        return {
            os.path.relpath(os.path.join(d, f), value): hashlib.sha256(
                open(os.path.join(d, f), "rb").read()
            ).hexdigest()
            for d, _, fs in os.walk(value)
            for f in fs
        }
    leaves = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, (str, os.PathLike)))
    data = lambda x: (
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    )
    return [np.asarray(data(x)).tobytes() if hasattr(x, "shape") else repr(x) for x in leaves]


def test_the_catalogue_has_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,build,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_modifies_nothing(name, build, words, tmp_path):
    fn, args, kwargs = build(tmp_path)
    before = [_snapshot(a) for a in args] + [_snapshot(v) for v in kwargs.values()]
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    missing = [w for w in words if w.replace("{tmp}", str(tmp_path)) not in message]
    assert not missing, f"{name}: {missing} not in {message!r}"
    after = [_snapshot(a) for a in args] + [_snapshot(v) for v in kwargs.values()]
    assert after == before, f"{name}: an argument was modified"


def test_safe_checks_under_jit_raise_when_the_call_runs():
    fn, (params, ad, x), _ = nan_input()
    with pytest.raises(Exception, match="params 'embed/embedding' has non-finite values"):
        jax.block_until_ready(jax.jit(fn)(params, ad, x))
    clean = base()
    np.testing.assert_array_equal(jax.jit(fn)(clean, ad, x), jlora.apply(model)(clean, ad, x))


def test_check_counts_the_adapter_and_passes_a_good_pair():
    ad = adapter()
    assert jlora.check(base(), ad) == 2 * (8 * 4 + 4 * 12)
