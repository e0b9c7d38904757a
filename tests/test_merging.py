"""TIES, DARE and magnitude-pruning merges against PEFT's ``add_weighted_adapter``.

Three PEFT adapters (one rank, different alphas; random B) on a torch net are loaded into
jlora and merged both ways; the merged deltas ``s B A`` must agree (fp32, 1e-5). DARE is
random: PEFT's ``random_pruning`` is given the masks jlora documents drawing, so both
prune the same entries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

import jlora  # noqa: E402

WEIGHTS, DENSITY, KEY = [0.7, -0.4, 1.3], 0.5, jax.random.key(5)
MODULES = ("0", "2")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 8))


def _params():
    net = _net()
    return {m: {"kernel": jnp.asarray(net[int(m)].weight.detach().numpy().T)} for m in MODULES}


def _peft_model(tmp_path):
    """PEFT adapters ``t0..t2`` and the same adapters loaded into jlora."""
    pm = None
    for i, alpha in enumerate((4, 8, 6)):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(
            r=4, lora_alpha=alpha, target_modules=list(MODULES), init_lora_weights=False
        )
        if pm is None:
            pm = peft.get_peft_model(_net(), cfg, adapter_name="t0")
        else:
            pm.add_adapter(f"t{i}", cfg)
    pm.save_pretrained(tmp_path)  # one subfolder per adapter (no "default" one)
    mine = [
        jlora.peft.load(
            str(tmp_path / f"t{i}"), _params(), module_fn=lambda p, idx=(): p.split("/")[0]
        )
        for i in range(3)
    ]
    return pm, mine


def _dare_masks(mine, svd: bool):
    """``[(torch tensor, mask)]``: the masks jlora draws (its documented key folding)."""
    pairs = []
    for j, path in enumerate(sorted(jlora._src.adapter.adapter_nodes(mine[0]))):
        for i, ad in enumerate(mine):
            node = jlora._src.adapter.adapter_nodes(ad)[path]
            k = jax.random.fold_in(jax.random.fold_in(KEY, j), i)
            parts = [node.scale * (node.a @ node.b)] if svd else [node.a, node.b]
            for part, t in enumerate(parts):
                mask = jax.random.bernoulli(jax.random.fold_in(k, part), DENSITY, t.shape)
                pairs.append((np.asarray(t).T, np.asarray(mask).T))
    return pairs


def _patched_random_pruning(pairs):
    def random_pruning(tensor, density, rescale):
        t = tensor.detach().numpy()
        (mask,) = [
            m
            for want, m in pairs
            if want.shape == t.shape and np.allclose(want, t, rtol=1e-6, atol=1e-7)
        ]
        out = tensor * torch.tensor(mask, dtype=tensor.dtype)
        return out / density if rescale else out

    return random_pruning


CASES = [(m, "total") for m in jlora._src.transforms.ties_dare.METHODS] + [
    (m, "frequency") for m in jlora._src.transforms.ties_dare.METHODS if "ties" in m
]


@pytest.mark.parametrize("method, sign", CASES)
def test_merges_equal_peft_add_weighted_adapter(tmp_path, monkeypatch, method, sign):
    pm, mine = _peft_model(tmp_path)
    if method.startswith("dare"):
        monkeypatch.setattr(
            merge_utils,
            "random_pruning",
            _patched_random_pruning(_dare_masks(mine, method.endswith("_svd"))),
        )
    pm.add_weighted_adapter(
        ["t0", "t1", "t2"],
        WEIGHTS,
        "merged",
        combination_type=method,
        density=DENSITY,
        majority_sign_method=sign,
    )
    got = jlora.combine_adapters(
        mine, WEIGHTS, method=method, density=DENSITY, majority_sign_method=sign, key=KEY
    )
    for m in MODULES:
        node = got[m]["kernel"]
        want = pm.base_model.model[int(m)].get_delta_weight("merged").detach().numpy().T
        np.testing.assert_allclose(
            node.scale * np.asarray(node.a @ node.b), want, rtol=1e-5, atol=1e-5
        )


def test_merge_arguments_are_checked(tmp_path):
    ads = [
        jlora.init(jax.random.key(i), _params(), jlora.LoraConfig(rank=2, targets=MODULES))
        for i in range(2)
    ]
    with pytest.raises(jlora.LoraError, match="density in"):
        jlora.combine_adapters(ads, [1, 1], method="ties")
    with pytest.raises(jlora.LoraError, match="pass key="):
        jlora.combine_adapters(ads, [1, 1], method="dare_linear", density=0.5)
    with pytest.raises(jlora.LoraError, match="majority_sign_method"):
        jlora.combine_adapters(ads, [1, 1], method="ties", density=0.5, majority_sign_method="mean")
    other = jlora.init(jax.random.key(3), _params(), jlora.LoraConfig(rank=3, targets=MODULES))
    with pytest.raises(jlora.LoraError, match="one rank.*_svd"):
        jlora.combine_adapters([ads[0], other], [1, 1], method="ties", density=0.5)
