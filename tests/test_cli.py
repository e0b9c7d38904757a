"""The jlora command: inspect, merge and convert (memory is in test_memory.py)."""

import jax
import llama
import numpy as np

import jlora
from conftest import randomize
from jlora.cli import load_base, main


def _files(tmp_path, key):
    params = llama.init_params(llama.LlamaConfig(), key)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    base = tmp_path / "base.npz"
    np.savez(base, **{jax.tree_util.keystr(kp): np.asarray(v) for kp, v in flat})
    ad = randomize(jlora.init(key, params, jlora.LoraConfig.preset("quick")), key)
    jlora.save_adapter(tmp_path / "ad", ad)
    return params, ad, str(base), str(tmp_path / "ad")


def test_merge_convert_inspect(tmp_path, key, capsys):
    params, ad, base, path = _files(tmp_path, key)
    assert jax.tree.structure(load_base(base)) == jax.tree.structure(params)
    main(["merge", base, path, str(tmp_path / "merged.npz")])
    merged = load_base(str(tmp_path / "merged.npz"))
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(jlora.merge(params, ad))):
        np.testing.assert_array_equal(got, want)
    main(["convert", path, str(tmp_path / "peft")])
    main(["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--base", base])
    back = jlora.load_adapter(tmp_path / "back", params)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(got, want)
    capsys.readouterr()
    main(["inspect", path])
    out = capsys.readouterr().out
    n = sum(x.size for x in jax.tree.leaves(ad))
    assert "jlora adapter, 2 adapted leaves" in out and f"{n:,} parameters" in out
    main(["inspect", str(tmp_path / "peft"), "--base", base])
    assert "PEFT adapter, 2 adapted leaves" in capsys.readouterr().out


def test_inspect_shows_full_modules_and_token_rows(tmp_path, key, capsys):
    params = llama.init_params(llama.LlamaConfig(), key)
    cfg = jlora.LoraConfig(targets=("q_proj",), modules_to_save=("lm_head",),
                           trainable_token_indices=[1, 2])
    jlora.save_adapter(tmp_path / "ad", jlora.init(key, params, cfg))
    main(["inspect", str(tmp_path / "ad")])
    out = capsys.readouterr().out
    assert "| params/lm_head/kernel | (128, 256) | - | - | - | trained in full" in out
    assert "| params/embed_tokens/embedding | (256, 128) | - | - | - | token rows 1, 2 " in out
