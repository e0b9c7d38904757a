"""Differential testing of the interpreter: random small programs, jlora against the merge.

``build(seed)`` makes a small JAX program that uses one adapted weight in one to
three ways drawn from the uses jlora has rules for (``dot_general`` layouts,
shape ops, gathers, convolutions, ``ragged_dot``, scan/while/cond/fori, remat
with policies, ``custom_jvp``/``custom_vjp`` with rules that differ from the
primal's derivative, ``vmap``, nested ``jit``, dtype round trips), stored in one
of several layouts, optionally wrapped whole in ``jit``/``checkpoint``/``vmap``,
sometimes with DoRA, sometimes run as a mixed batch of two stacked adapters.
``verdict(seed)`` runs it through ``jlora.apply`` (eager and jitted) and the same
function on the merged weights (``conftest.ref_merge_jnp``, plain ``jnp``):
outputs and adapter gradients must agree. The verdict is ``"right"``,
``"refused"`` (a ``LoraError``) or ``"wrong: ..."``/``"crash: ..."``, the bugs
(``"invalid"``: JAX itself cannot run the program, e.g. ``vmap`` of a
``checkpoint_name`` under ``jax_remat3``; no verdict on jlora).

``python tests/differential.py START COUNT`` runs seeds ``START..START+COUNT`` and
prints a tally (the long run; ``tests/test_differential.py`` runs a fixed slice).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import jlora
from conftest import ref_merge_jnp

F32 = dict(rtol=2e-5, atol=2e-5)
LOOSE = dict(rtol=3e-2, atol=3e-2)  # bf16 storage or a bf16 round trip
KEEPS = ("custom_vjp: keeps", "custom_jvp: keeps")
B = 3  # examples


@dataclasses.dataclass
class Case:
    seed: int
    what: str  # store, uses and wrapper, for the report
    fn: Callable
    params: dict
    adapter: Any
    args: tuple
    grad: bool = True
    tol: dict = dataclasses.field(default_factory=lambda: dict(F32))
    ids: Any = None  # a mixed batch: each example's adapter (-1: the base)
    custom: bool = False  # a custom derivative receives the weight


# --- the weight as the model reads it: x (..., I) times the logical (I, O) weight ---


def _mm(store):
    return {"io": lambda w, x: x @ w, "oi": lambda w, x: x @ w.T, "table": lambda w, x: x @ w.T}[
        store
    ]


def _scaled_mm():
    @jax.custom_vjp
    def f(w, x):
        return x @ w

    f.defvjp(
        lambda w, x: (x @ w, (w, x)),
        lambda r, g: (0.5 * jnp.einsum("...i,...o->io", r[1], g), 0.5 * g @ r[0].T),
    )
    return f


def _ste():
    f = jax.custom_jvp(lambda w: jnp.round(w * 4) / 4)
    f.defjvp(lambda p, t: (f(*p), t[0]))
    return f


def _clip_grad():
    """custom_vjp on the weight alone: the backward clips the cotangent."""

    @jax.custom_vjp
    def f(w):
        return w

    f.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -0.05, 0.05),))
    return f


POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "names": jax.checkpoint_policies.save_only_these_names("h"),
    "nobatch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _matrix_uses(store, I, O):
    """Uses of a 2-D weight stored ``io`` or ``oi``: name -> (fn(w, x), grad ok)."""
    mm = _mm(store)
    io = (lambda w: w) if store == "io" else (lambda w: w.T)  # the (I, O) view
    u = {
        "dot": lambda w, x: mm(w, x),
        "einsum_seq": lambda w, x: jnp.einsum(
            "bsi,io->bso", x[:, None, :] * jnp.ones((1, 2, 1)), io(w)
        ),
        "transpose_twice": lambda w, x: x @ io(w).T.T,
        "slice": lambda w, x: x @ io(w)[:, : O - 1],
        "slice_in": lambda w, x: x[:, 1:] @ io(w)[1:],
        "concat": lambda w, x: x @ jnp.concatenate([io(w), 2.0 * io(w)], axis=1),
        "scale": lambda w, x: x @ (io(w) * 0.5),
        "bf16_round_trip": lambda w, x: (
            x.astype(jnp.bfloat16) @ io(w).astype(jnp.bfloat16)
        ).astype(jnp.float32),
        "rows": lambda w, x: io(w)[jnp.array([0, I - 1, 1])],
        "index_row": lambda w, x: io(w)[1][None, :] + 0 * x[:, :1],
        "elementwise": lambda w, x: jnp.tanh(io(w)).sum(0)[None, :] + 0 * x[:, :1],
        "vmap": lambda w, x: jax.vmap(lambda xi: mm(w, xi))(x),
        "vmap_weight_in": lambda w, x: jax.vmap(lambda xi, ww: xi @ io(ww), (0, None))(x, w),
        "nested_jit": lambda w, x: jax.jit(lambda w, x: jnp.tanh(mm(w, x)))(w, x),
        "cond": lambda w, x: lax.cond(jnp.sum(x) > 0, lambda: mm(w, x), lambda: -(mm(w, x) ** 2)),
        "scan_seq": lambda w, x: lax.scan(
            lambda c, xt: (c + jnp.tanh(mm(w, xt)), mm(w, xt)), jnp.zeros((O,)), x
        )[1],
        "fori": lambda w, x: lax.fori_loop(
            0, 2, lambda i, h: h + jnp.tanh(mm(w, x) * h), jnp.ones((x.shape[0], O))
        ),
        "custom_vjp": lambda w, x: _scaled_mm()(io(w), x),
        "custom_jvp_ste": lambda w, x: x @ _ste()(io(w)),
        "custom_vjp_clip": lambda w, x: x @ _clip_grad()(io(w)),
    }
    for name, pol in POLICIES.items():
        u[f"remat_{name}"] = lambda w, x, pol=pol: jax.checkpoint(
            lambda w, x: jnp.tanh(checkpoint_name(mm(w, x), "h")) @ io(w).T, policy=pol
        )(w, x)
    out = {k: (f, True) for k, f in u.items()}
    if I == O:
        out["while"] = (
            lambda w, x: lax.while_loop(
                lambda c: c[1] < 2, lambda c: (jnp.tanh(mm(w, c[0])), c[1] + 1), (x, 0)
            )[0],
            False,
        )
    if I == O:
        out["chain"] = (lambda w, x: mm(w, jnp.tanh(mm(w, x))), True)
    if O % 2 == 0:
        out["dense_general"] = (
            lambda w, x: jnp.einsum("bi,ijk->bjk", x, io(w).reshape(I, O // 2, 2)).reshape(
                x.shape[0], O
            ),
            True,
        )
    return out


def _stacked_uses(L, I, O):
    """Uses of an ``(L, I, O)`` stack of layers or experts."""

    def scan_layers(w, x):
        body = lambda h, wl: (h + jnp.tanh(x @ wl).sum(-1, keepdims=True), x @ wl)
        return lax.scan(body, jnp.zeros((x.shape[0], 1)), w)[1]

    sizes = jnp.array([1] + [0] * (L - 2) + [2], jnp.int32)  # groups of B = 3 rows
    return {
        "scan_layers": (scan_layers, True),
        "scan_layers_reverse": (
            lambda w, x: lax.scan(lambda c, wl: (c, x @ wl), 0.0, w, reverse=True)[1],
            True,
        ),
        "index_layer": (lambda w, x: x @ w[1], True),
        "dynamic_index": (
            lambda w, x: x @ lax.dynamic_index_in_dim(w, jnp.argmax(x[0]) % L, keepdims=False),
            True,
        ),
        "batched": (lambda w, x: jnp.einsum("lbi,lio->lbo", jnp.stack([x] * L), w), True),
        "ragged_dot": (lambda w, x: lax.ragged_dot(x, w, sizes), True),
        "remat_scan": (
            lambda w, x: jax.checkpoint(scan_layers, policy=POLICIES["dots"])(w, x),
            True,
        ),
    }


def _conv_uses():
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda w, x, **kw: lax.conv_general_dilated(
        x, w, kw.pop("strides", (1, 1)), kw.pop("padding", "SAME"), dimension_numbers=dn, **kw
    )
    return {
        "conv": (lambda w, x: conv(w, x), True),
        "conv_strided": (lambda w, x: conv(w, x, strides=(2, 1), padding="VALID"), True),
        "conv_dilated": (lambda w, x: conv(w, x, rhs_dilation=(2, 1)), True),
        "conv_remat": (lambda w, x: jax.checkpoint(conv)(w, x), True),
    }


def _table_uses():
    ids = jnp.array([[0, 3, 1], [2, 2, 4], [1, 0, 0]])
    return {
        "lookup": (lambda w, x: w[ids], True),
        "take": (lambda w, x: jnp.take(w, ids, axis=0), True),
        "tied": (lambda w, x: x @ w.T, True),
        "one_hot": (lambda w, x: jax.nn.one_hot(ids, w.shape[0]) @ w, True),
    }


WRAPPERS = ("none", "jit", "remat", "vmap", "cond")  # the first three keep examples apart
#: Uses whose example i depends on other examples (a mixed batch's reference runs each alone).
MIXES_EXAMPLES = {"cond", "scan_seq", "while"}


def _wrap(name, fn):
    if name == "jit":
        return jax.jit(fn)
    if name == "remat":
        return jax.checkpoint(fn, policy=POLICIES["dots"])
    if name == "vmap":  # over a leading copy axis of x
        return lambda p, x: jax.vmap(fn, (None, 0))(p, jnp.stack([x, -x]))
    if name == "cond":
        return lambda p, x: lax.cond(
            x.reshape(-1)[0] > -100.0, fn, lambda p, x: jax.tree.map(jnp.zeros_like, fn(p, x)), p, x
        )
    return fn


def _store(rng):
    """(store, weight shape, x shape, uses)."""
    kind = rng.choice(["io", "oi", "io", "oi", "stacked", "conv", "table"])
    I, O = (int(v) for v in rng.integers(3, 8, size=2))
    if rng.random() < 0.3:
        O = I
    if kind in ("io", "oi"):
        shape = (I, O) if kind == "io" else (O, I)
        return kind, shape, (B, I), _matrix_uses(kind, I, O)
    if kind == "stacked":
        L = int(rng.integers(2, 4))
        return kind, (L, I, O), (B, I), _stacked_uses(L, I, O)
    if kind == "conv":
        return kind, (3, 2, I, O), (2, 5, 4, I), _conv_uses()
    return kind, (5, I), (B, I), _table_uses()


def build(seed: int) -> tuple[Case, Callable[[], None]]:
    """The program of ``seed`` (deterministic), and what gives it its adapter (init)."""
    rng = np.random.default_rng(seed)
    store, shape, xshape, uses = _store(rng)
    mixed = rng.random() < 0.2 and store in ("io", "oi")
    names = sorted(n for n in uses if not mixed or n not in MIXES_EXAMPLES)
    picked = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)]
    wrappers = WRAPPERS[:3] if mixed or "ragged_dot" in picked else WRAPPERS  # JAX: no vmap
    wrapper = str(rng.choice(wrappers))
    dtype = jnp.bfloat16 if rng.random() < 0.15 else jnp.float32
    dora = rng.random() < 0.2
    learn = store not in ("io", "oi") or rng.random() < 0.5

    def body(p, x):
        w = p["w"]
        return tuple(uses[n][0](w, x.astype(w.dtype)) for n in picked)

    fn = _wrap(wrapper, body)
    key = jax.random.key(seed)
    params = {"w": (jax.random.normal(key, shape) / np.sqrt(shape[-2])).astype(dtype)}
    x = jax.random.normal(jax.random.fold_in(key, 1), xshape)
    cfg = jlora.LoraConfig(rank=int(rng.integers(1, 4)), targets=("w",), dora=bool(dora))
    flags = f"{' dora' if dora else ''}{' learned' if learn else ''}{' mixed' if mixed else ''}"
    case = Case(
        seed,
        f"{store}{shape} {'+'.join(picked)} wrap={wrapper} {jnp.dtype(dtype).name}{flags}",
        fn,
        params,
        None,
        (x,),
        grad=all(uses[n][1] for n in picked),
        custom=any(n.startswith("custom") for n in picked),
    )
    if dtype == jnp.bfloat16 or any("bf16" in n for n in picked):
        case.tol = dict(LOOSE)
    ids = jnp.asarray(rng.integers(-1, 2, size=B), jnp.int32) if mixed else None
    return case, lambda: _adapt(case, cfg, learn, ids)


def _adapt(case: Case, cfg, learn: bool, ids) -> None:
    """Give ``case`` its adapter (random factors; two stacked ones with ``ids``)."""
    (x,), key = case.args, jax.random.key(case.seed)
    init = lambda k: _random(jlora.init(k, case.params, cfg, *((case.fn, x) if learn else ())), k)
    if ids is None:
        case.adapter = init(jax.random.fold_in(key, 2))
    else:
        case.adapter = jlora.stack(
            [init(jax.random.fold_in(key, 2)), init(jax.random.fold_in(key, 3))]
        )
        case.ids = ids


def _random(adapter, key):
    leaves, tree = jax.tree.flatten(adapter)
    return jax.tree.unflatten(
        tree,
        [  # B is zero at init, which would test nothing
            v + (0.3 * jax.random.normal(jax.random.fold_in(key, i), v.shape)).astype(v.dtype)
            for i, v in enumerate(leaves)
        ],
    )


def _close(got, want, tol, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


def _reference(case: Case):
    """``fn`` on the merged weights (a mixed batch: each example its own adapter)."""
    if case.ids is None:
        return lambda ad: case.fn(ref_merge_jnp(case.params, ad), *case.args)
    (x,) = case.args

    def ref(stacked):
        ads = jlora.unstack(stacked)
        outs = [
            case.fn(case.params if i < 0 else ref_merge_jnp(case.params, ads[i]), x[e : e + 1])
            for e, i in enumerate(np.asarray(case.ids))
        ]
        return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)

    return ref


def check(case: Case) -> None:
    """Raise unless jlora's outputs and gradients equal the reference's."""
    kw = {} if case.ids is None else dict(adapter_ids=case.ids)
    lora = lambda ad: jlora.apply(case.fn)(case.params, ad, *case.args, **kw)
    ref = _reference(case)
    uses = [
        u
        for us in jlora.explain(case.fn, case.params, case.adapter, *case.args, **kw).values()
        for u in us
    ]
    unexplained = [u for u in uses if u.startswith("materialized") and "(" not in u]
    assert not unexplained, f"materialized with no reason: {unexplained}"
    if case.custom:
        assert any(k in u for u in uses for k in KEEPS), f"custom rule not named: {uses}"
    want = ref(case.adapter)
    _close(lora(case.adapter), want, case.tol, "eager outputs")
    _close(jax.jit(lora)(case.adapter), want, case.tol, "jitted outputs")
    if not case.grad:
        return
    cots = [
        jax.random.normal(jax.random.key(7 + i), jnp.shape(w))
        for i, w in enumerate(jax.tree.leaves(want))
    ]
    loss = lambda out: sum(
        jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(jax.tree.leaves(out), cots)
    )
    got = jax.jit(jax.grad(lambda ad: loss(lora(ad))))(case.adapter)
    _close(got, jax.grad(lambda ad: loss(ref(ad)))(case.adapter), case.tol, "gradients")


def verdict(seed: int) -> tuple[str, str]:
    """``(verdict, what the program was)``: right, refused, wrong: ... or crash: ... (the
    bugs), or invalid: ... when JAX itself cannot run the program without jlora."""
    case, adapt = build(seed)
    if _jax_fails(case):
        return "invalid: JAX itself cannot run it", case.what
    try:
        adapt()  # jlora.init
        check(case)
        return "right", case.what
    except jlora.LoraError as e:
        return "refused", f"{case.what}: {str(e)[:160]}"
    except AssertionError as e:
        return "wrong: " + " ".join(str(e).split())[:300], case.what
    except Exception as e:  # noqa: BLE001 - every other exception is a bug to report
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return f"crash: {type(e).__name__}: {str(e)[:160]} at {tb.filename}:{tb.lineno}", case.what


def _jax_fails(case: Case) -> bool:
    """Whether the program without jlora fails in JAX itself (then no verdict on jlora):
    its outputs, and its gradient when the case checks gradients, on the base weights."""
    f = lambda p: sum(
        jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(case.fn(p, *case.args))
    )
    try:
        jax.grad(f)(case.params) if case.grad else f(case.params)
        return False
    except Exception:  # noqa: BLE001 - any failure of JAX's own
        return True


def main(start: int, count: int, show_refused: bool = False) -> None:
    tally = collections.Counter()
    for seed in range(start, start + count):
        v, what = verdict(seed)
        tally[v.split(":")[0]] += 1
        if v != "right" and (v != "refused" or show_refused):
            print(f"seed {seed}: {v}\n    {what}", flush=True)
        jax.clear_caches()
    print(dict(tally))


if __name__ == "__main__":
    jax.config.update("jax_numpy_rank_promotion", "raise")
    main(int(sys.argv[1]), int(sys.argv[2]), "-v" in sys.argv)
