import math

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._src.targets import path_str


def test_presets_follow_the_source_table():
    rows = {
        name: (c.rank, c.alpha, c.targets)
        for name in jlora.PRESETS
        for c in [jlora.LoraConfig.preset(name)]
    }
    assert rows["quick"] == (8, 16.0, ("q_proj", "v_proj"))
    assert rows["general"] == (16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert rows["complex"][:2] == (32, 64.0) and len(rows["complex"][2]) == 7
    assert rows["constrained"] == (4, 8.0, ("q_proj", "v_proj"))
    assert jlora.LoraConfig.preset("complex", rank=64, alpha=128.0).rank == 64


def test_scaling_plain_and_rslora():
    assert jlora.LoraConfig(rank=16, alpha=32.0).scaling_for(16, 32.0) == 2.0
    rs = jlora.LoraConfig(rank=16, alpha=32.0, rslora=True)
    assert rs.scaling_for(16, 32.0) == pytest.approx(32.0 / math.sqrt(16))


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-2), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets="q_proj(["), "targets"),
        (dict(targets=()), "targets"),
        (dict(init="xavier"), "init"),
        (dict(rank_pattern={"q": 0}), "rank_pattern"),
        (dict(exclude="layers_(["), "exclude"),
        (dict(exclude=("",)), "exclude"),
        (dict(exclude=3), "exclude"),
    ],
)
def test_bad_config_is_a_clear_error(kw, word):
    with pytest.raises(jlora.LoraError, match=word):
        jlora.LoraConfig(**kw)


def test_unknown_preset():
    with pytest.raises(jlora.LoraError, match="quick"):
        jlora.LoraConfig.preset("huge")


def _params():
    return {
        "params": {
            "layers_0": {"attn": {"q_proj": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones((8,))}}},
            "norm": {"scale": jnp.ones((8,))},
        }
    }


def test_targets_match_nothing_lists_paths(key):
    with pytest.raises(jlora.LoraError, match="params/layers_0/attn/q_proj/kernel"):
        jlora.init(key, _params(), jlora.LoraConfig(targets=("query",)))


def test_regex_target_on_a_vector_is_refused(key):
    with pytest.raises(jlora.LoraError, match="not a matrix"):
        jlora.init(key, _params(), jlora.LoraConfig(rank=2, targets="q_proj/bias"))


def test_regex_and_names_select_the_same_kernel(key):
    by_name = jlora.init(key, _params(), jlora.LoraConfig(rank=2, targets=("q_proj",)))
    by_regex = jlora.init(key, _params(), jlora.LoraConfig(rank=2, targets=r"q_proj/kernel$"))
    assert jax.tree.structure(by_name) == jax.tree.structure(by_regex)
    assert by_name["params"]["layers_0"]["attn"]["q_proj"]["bias"] is None


def test_rank_and_alpha_patterns(key):
    p = {"q_proj": {"kernel": jnp.ones((8, 8))}, "v_proj": {"kernel": jnp.ones((8, 8))}}
    cfg = jlora.LoraConfig(
        rank=2,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 1.0},
    )
    ad = jlora.init(key, p, cfg)
    assert ad["q_proj"]["kernel"].a.shape == (8, 2) and ad["q_proj"]["kernel"].scale == 2.0
    assert ad["v_proj"]["kernel"].a.shape == (8, 4) and ad["v_proj"]["kernel"].scale == 0.25
    with pytest.raises(jlora.LoraError, match="rank_pattern"):
        jlora.init(
            key, p, jlora.LoraConfig(rank=2, targets=("q_proj",), rank_pattern={"k_proj": 4})
        )


def test_rank_larger_than_kernel(key):
    with pytest.raises(jlora.LoraError, match="exceeds"):
        jlora.init(
            key,
            {"q_proj": {"kernel": jnp.ones((8, 3))}},
            jlora.LoraConfig(rank=4, targets=("q_proj",)),
        )


def test_path_str_drops_nnx_value_and_joins():
    tu = jax.tree_util
    kp = (tu.DictKey("a"), tu.SequenceKey(0), tu.GetAttrKey("kernel"), tu.GetAttrKey("value"))
    assert path_str(kp) == "a/0/kernel"


def test_adapter_for_other_params_is_a_clear_error(key):
    p = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    ad = jlora.init(key, p, jlora.LoraConfig(rank=2, targets=("q_proj",)))
    f = jlora.apply(lambda p, x: x @ p["q_proj"]["kernel"])
    with pytest.raises(jlora.LoraError, match=r"'q_proj/kernel'.*\(8, 8\).*\(8, 4\)"):
        f({"q_proj": {"kernel": jnp.ones((8, 4))}}, ad, jnp.ones((2, 8)))
    with pytest.raises(jlora.LoraError, match="not in params.*k_proj/kernel"):
        f({"k_proj": {"kernel": jnp.ones((8, 8))}}, ad, jnp.ones((2, 8)))


def test_non_array_params_leaf_is_named(key):
    ad = jlora.init(key, {"w": jnp.ones((4, 4))}, jlora.LoraConfig(rank=2, targets=("w",)))
    with pytest.raises(TypeError, match="'flag' is a bool"):
        jlora.apply(lambda p, x: x @ p["w"])(
            {"w": jnp.ones((4, 4)), "flag": True}, ad, jnp.ones((2, 4))
        )


def test_exclude_leaves_out_matching_paths(key):
    """PEFT's exclude_modules: the same syntax as targets, applied after them."""
    params = {
        "params": {
            f"layers_{i}": {
                "attn": {
                    "q_proj": {"kernel": jnp.ones((8, 8))},
                    "v_proj": {"kernel": jnp.ones((8, 8))},
                }
            }
            for i in range(3)
        }
    }
    for exclude in ("layers_1/", ("layers_1",)):
        cfg = jlora.LoraConfig(rank=2, targets=("q_proj", "v_proj"), exclude=exclude)
        nodes = jlora._src.adapter.adapter_nodes(jlora.init(key, params, cfg))
        assert sorted(nodes) == [
            f"params/layers_{i}/attn/{m}/kernel" for i in (0, 2) for m in ("q_proj", "v_proj")
        ]
    with pytest.raises(jlora.LoraError, match="matched no parameter outside exclude"):
        jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("q_proj",), exclude="attn"))


LAYERED = {  # a model with a leaf per layer, named as Linen, NNX/Equinox and GPT-2 do
    "layers_{}": lambda leaf: {f"layers_{i}": leaf(i) for i in range(4)},
    "layers/{}": lambda leaf: {"layers": {str(i): leaf(i) for i in range(4)}},
    "h/{}": lambda leaf: {"h": {str(i): leaf(i) for i in range(4)}},
}


@pytest.mark.parametrize("layer_key", sorted(LAYERED))
def test_layers_to_transform_adapts_only_those_layers(key, layer_key):
    """PEFT's layers_to_transform / layers_pattern on a model with a leaf per layer."""
    layers = LAYERED[layer_key](lambda i: {"q_proj": {"kernel": jnp.ones((8, 8))}})
    params = {"model": {**layers, "lm_head": {"kernel": jnp.ones((8, 8))}}}
    cfg = jlora.LoraConfig(rank=2, targets=("q_proj", "lm_head"), layers_to_transform=[1, 3])
    nodes = jlora._src.adapter.adapter_nodes(jlora.init(key, params, cfg))
    assert sorted(nodes) == [f"model/{layer_key.format(i)}/q_proj/kernel" for i in (1, 3)]
    only = jlora.LoraConfig(
        rank=2,
        targets=("q_proj",),
        layers_to_transform=2,
        layers_pattern=layer_key.split("/")[0].split("_")[0],
    )
    assert list(jlora._src.adapter.adapter_nodes(jlora.init(key, params, only))) == [
        f"model/{layer_key.format(2)}/q_proj/kernel"
    ]
