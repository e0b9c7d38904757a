"""qwix LoRA (``qwix.apply_lora_to_model``) on the example Linen model for ``peers.py``."""

import jax
import jax.numpy as jnp
import llama
import optax
import qwix
from peers import (
    ALPHA,
    LR,
    QFORMATS,
    RANK,
    TARGETS,
    base_params,
    batch,
    config,
    timed,
    xla_mb,
)


def _is_lora(path) -> bool:
    return "kernel_lora_" in jax.tree_util.keystr(path)


def _merged(tree):
    """Plain kernels ``W + (alpha / r) A @ B`` (qwix's scaling), lora leaves dropped."""
    if not isinstance(tree, dict):
        return tree
    out = {k: _merged(v) for k, v in tree.items() if not k.startswith("kernel_lora_")}
    if "kernel_lora_a" in tree:
        out["kernel"] = (
            tree["kernel"] + (ALPHA / RANK) * tree["kernel_lora_a"] @ tree["kernel_lora_b"]
        )
    return out


def run(repeats: int) -> dict:
    cfg, params = config(), base_params()
    model = llama.Llama(cfg)
    rule = qwix.LoraRule(module_path=".*(" + "|".join(TARGETS) + ")", rank=RANK, alpha=ALPHA)
    lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
    ids = jnp.asarray(batch())
    x, y = ids[:, :-1], ids[:, 1:]
    fresh = lora_model.init(jax.random.key(1), x)
    # the base's weights, qwix's A and B (B != 0, as after training)
    base = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    full_tree = jax.tree_util.tree_map_with_path(
        lambda k, v: v + 1e-3 if _is_lora(k) else base[jax.tree_util.keystr(k)], fresh
    )
    split = lambda t, want: jax.tree_util.tree_map_with_path(
        lambda k, v: v if _is_lora(k) == want else None, t
    )
    lora, frozen = split(full_tree, True), split(full_tree, False)
    join = lambda a, b: jax.tree.map(
        lambda u, v: v if u is None else u, a, b, is_leaf=lambda z: z is None
    )
    merged = _merged(full_tree)
    tx = optax.adamw(LR)

    def make(loss):
        @jax.jit
        def step(trained, opt, *rest):
            g = jax.grad(loss)(trained, *rest)
            u, opt = tx.update(g, opt, trained)
            return optax.apply_updates(trained, u), opt

        return step

    lora_loss = lambda ad, fr: llama.loss_fn(lora_model.apply(join(ad, fr), x), y)
    full_loss = lambda p: llama.loss_fn(model.apply(p, x), y)
    lora_step, full_step = make(lora_loss), make(full_loss)
    state = {"lora": (lora, tx.init(lora)), "full": (params, tx.init(params))}

    def stepper(name, f, *rest):
        def go():
            state[name] = jax.block_until_ready(f(*state[name], *rest))

        return go

    fwd, lfwd = jax.jit(model.apply), jax.jit(lora_model.apply)
    block = jax.block_until_ready
    calls = dict(
        base_forward=lambda: block(fwd(params, x)),
        lora_forward=lambda: block(lfwd(full_tree, x)),
        merged_forward=lambda: block(fwd(merged, x)),
        lora_step=stepper("lora", lora_step, frozen),
        full_step=stepper("full", full_step),
    )
    mb = {}
    for qtype in QFORMATS:  # QLoRA: quantized frozen kernels, tiles as in jlora's formats
        tile = {"int4": 128, "mxfp4": 32, "mxfp8": 32, "nvfp4": 16}.get(qtype)
        row = f"qlora_{qtype}_step"
        calls[row], mb[row] = _qlora_step(model, rule, qtype, tile, full_tree, x, y)
    return dict(times=timed(calls, repeats), xla_mb=mb)


def _qlora_step(model, rule, qtype, tile, full_tree, x, y):
    """qwix's LoRA with ``weight_qtype``: the same rule, the base kernels quantized; the
    step and XLA's MB for it."""
    import dataclasses

    qrule = dataclasses.replace(rule, weight_qtype=qtype, tile_size=tile)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider([qrule]))
    tree = qmodel.init(jax.random.key(1), x)
    ref = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(full_tree)[0]
    }
    tree = jax.tree_util.tree_map_with_path(  # the same weights where the paths agree
        lambda k, v: ref.get(jax.tree_util.keystr(k), v), tree
    )
    lora = jax.tree_util.tree_map_with_path(lambda k, v: v if _is_lora(k) else None, tree)
    frozen = jax.tree_util.tree_map_with_path(lambda k, v: None if _is_lora(k) else v, tree)
    join = lambda a, b: jax.tree.map(
        lambda u, v: v if u is None else u, a, b, is_leaf=lambda z: z is None
    )
    tx = optax.adamw(LR)
    loss = lambda ad, fr: llama.loss_fn(qmodel.apply(join(ad, fr), x), y)

    @jax.jit
    def step(ad, opt, fr):
        g = jax.grad(loss)(ad, fr)
        u, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, u), opt

    state = [lora, tx.init(lora)]

    def go():
        state[:] = jax.block_until_ready(step(*state, frozen))

    return go, xla_mb(step, *state, frozen)
