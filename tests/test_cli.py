"""The jlora command: inspect, merge and convert (memory is in test_memory.py)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora
import jlora_cli
from conftest import randomize
from jlora._src import cli
from jlora._src.cli import load_base, main

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from test_hf_llama import hf_model  # noqa: E402


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
    cfg = jlora.LoraConfig(
        targets=("q_proj",), modules_to_save=("lm_head",), trainable_token_indices=[1, 2]
    )
    jlora.save_adapter(tmp_path / "ad", jlora.init(key, params, cfg))
    main(["inspect", str(tmp_path / "ad")])
    out = capsys.readouterr().out
    assert "| params/lm_head/kernel | (128, 256) | - | - | - | trained in full" in out
    assert "| params/embed_tokens/embedding | (256, 128) | - | - | - | token rows 1, 2 " in out


def test_help_does_not_import_jax():
    """`jlora --help` (and a subcommand's) answers without loading JAX or jlora."""
    code = (
        "import sys, jlora_cli\n"
        "for argv in (['--help'], ['convert', '--help']):\n"
        "    try:\n        jlora_cli.main(argv)\n    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "print(sorted(m for m in ('jax', 'jlora', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: jlora convert" in out and out.strip().endswith("[]")
    assert jlora_cli.MEMORY_TARGETS == jlora._src.memory.LINEAR[:4]  # memory's default, unimported


def test_errors_are_one_line(tmp_path, capsys):
    """A LoraError (or a missing file) prints `jlora: error: ...` and exits 1, no traceback."""
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jlora: error: no adapter directory") and err.count("\n") == 1
    assert main(["convert", str(tmp_path), str(tmp_path / "b"), "--module-fn", "nocolon"]) == 1
    assert "expected MODULE:FUNCTION" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "jlora_cli", "merge", "a.npz", "b", "c"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def _hf_llama(tmp_path, key):
    """A tiny random LlamaForCausalLM saved as model.safetensors, its jlora params, an adapter."""
    model = hf_model(kv_heads=2)
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    config = llama.config_from_hf(model.config, scan_layers=True)
    params = llama.from_hf(model.state_dict(), config)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    ad = randomize(jlora.init(key, params, cfg), key)
    jlora.save_adapter(tmp_path / "ad", ad)
    return model, config, params, ad


def test_convert_for_transformers_gives_jlora_logits(tmp_path, key, capsys):
    """Converted with the model's naming, real PEFT gives jlora's logits (not the base's)."""
    peft = pytest.importorskip("peft")
    model, config, params, ad = _hf_llama(tmp_path, key)
    src, base = str(tmp_path / "ad"), str(tmp_path)
    # the default naming lacks transformers' `model.` level: refused, naming the fix
    assert main(["convert", src, str(tmp_path / "p0"), "--base", base]) == 1
    err = capsys.readouterr().err
    assert "not in the torch base" in err and "--prefix base_model.model.model." in err
    assert not (tmp_path / "p0").exists()
    ids = np.array(jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size))
    want = jlora.apply(llama.Llama(config).apply)(params, ad, jnp.asarray(ids))
    with torch.no_grad():
        base = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(want) - base).max() > 0.05  # the adapter changes the logits
    for flags in (
        ["--module-fn", f"{llama.__file__}:hf_module"],
        ["--prefix", "base_model.model.model."],
    ):
        dst = str(tmp_path / flags[0])
        assert (
            main(["convert", src, dst, "--base", str(tmp_path / "model.safetensors"), *flags]) == 0
        )
        out = capsys.readouterr().out
        assert "(PEFT): 6 modules, model.layers.0.mlp.down_proj, " in out, out
        got = peft.PeftModel.from_pretrained(hf_model(kv_heads=2), dst).eval()
        with torch.no_grad():
            got = got(torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_convert_peft_with_a_torch_base(tmp_path, key, capsys):
    """PEFT -> jlora over the torch model's own safetensors: torch names, (out, in) weights."""
    pytest.importorskip("peft")
    _, _, _, ad = _hf_llama(tmp_path, key)
    peft_dir, back = str(tmp_path / "peft"), str(tmp_path / "back")
    assert main(["convert", str(tmp_path / "ad"), peft_dir, "--module-fn", "llama:hf_module"]) == 0
    assert main(["convert", peft_dir, back, "--base", str(tmp_path)]) == 0
    torch_params = cli.torch_tree(cli.torch_base_files(str(tmp_path)))
    node = jlora.load_adapter(back, torch_params)["model"]["layers"]["1"]["self_attn"]
    node = node["q_proj"]["weight"]
    mine = ad["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert node.in_axes == (1,) and node.out_axes == (0,)
    np.testing.assert_array_equal(node.a, mine.a[1])
    np.testing.assert_array_equal(node.b, mine.b[1])
