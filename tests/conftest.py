import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# JLORA_JAX_FLAGS=jax_remat3,jax_custom_vjp3 runs the tests under JAX's opt-in flags (.ci/run)
for _flag in filter(None, os.environ.get("JLORA_JAX_FLAGS", "").split(",")):
    jax.config.update(_flag, True)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

F32 = dict(rtol=1e-5, atol=1e-5)

#: Seconds per test (setup + call + teardown, under ``-n 2``) as pytest measured them in
#: the last ``pytest -n 2 --record-durations`` run: pytest's own reports, written by
#: ``pytest_sessionfinish`` below. A test not in the file counts as fast.
DURATIONS = os.path.join(os.path.dirname(__file__), "durations.json")
#: The quick loop (``pytest -m "not slow"``) keeps the fastest tests whose recorded
#: seconds sum to at most this (two workers: about half of it in wall time); the
#: rest are marked ``slow``.
QUICK_BUDGET_S = 330.0
_measured: dict = {}


def pytest_addoption(parser):
    parser.addoption(
        "--record-durations",
        action="store_true",
        help="write each test's measured seconds to tests/durations.json",
    )


def pytest_runtest_logreport(report):
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    config = session.config
    if not config.getoption("--record-durations") or hasattr(config, "workerinput"):
        return  # (under xdist the controller receives every worker's reports)
    known = _recorded()
    known.update({k: round(v, 2) for k, v in _measured.items()})
    with open(DURATIONS, "w") as f:
        json.dump(dict(sorted(known.items())), f, indent=0)
        f.write("\n")


def _recorded() -> dict:
    if not os.path.exists(DURATIONS):
        return {}
    with open(DURATIONS) as f:
        return json.load(f)


def pytest_collection_modifyitems(config, items):
    """Order by recorded duration: the slow tests first, balanced between the two halves
    of the collection (``--dist worksteal`` hands one half to each worker first), so no
    long test starts late; the tests beyond the quick loop's budget are marked ``slow``."""
    seconds = _recorded()
    cost = lambda it: seconds.get(it.nodeid, 0.0)
    by_cost = sorted(items, key=cost)
    total, quick = 0.0, set()
    for it in by_cost:  # fastest first, until the budget is spent
        total += cost(it)
        if total > QUICK_BUDGET_S:
            break
        quick.add(it.nodeid)
    slow = [it for it in reversed(by_cost) if it.nodeid not in quick]
    for it in slow:
        it.add_marker(pytest.mark.slow)
    fast = [it for it in items if it.nodeid in quick]
    halves, load = ([], []), [0.0, 0.0]
    for it in slow:  # longest first, each to the lighter half
        k = load.index(min(load))
        halves[k].append(it)
        load[k] += cost(it)
    cut = max(0, len(items) // 2 - len(halves[0]))
    items[:] = halves[0] + fast[:cut] + halves[1] + fast[cut:]


BF16 = dict(rtol=1e-2, atol=1e-2)


def scanned(*paths):
    """``fn`` for ``jlora.init`` that runs a ``lax.scan`` over the layers of each
    ``(layers, in, out)`` leaf at ``paths`` (key tuples), so init learns that axis 0 is
    stacked: without ``fn`` the layout of a 3-D leaf outside a Flax scan is refused."""

    def fn(p):
        outs = []
        for path in paths:
            w = p
            for k in path:
                w = w[k]
            x = jnp.ones((1, w.shape[1]), w.dtype)
            outs.append(jax.lax.scan(lambda c, layer: (c, x @ layer), 0.0, w)[1])
        return outs

    return fn


def randomize(adapter, key, scale=0.1):
    """Give every adapter array random values (B is zero at init, which tests nothing)."""
    leaves, tree = jax.tree.flatten(adapter)
    new = [
        scale * jax.random.normal(jax.random.fold_in(key, i), l.shape, l.dtype)
        for i, l in enumerate(leaves)
    ]
    return jax.tree.unflatten(tree, new)


def ref_weight(w, node):
    """The materialized ``W0 + s * A @ B`` in numpy, mapped back onto w's axes."""
    w = np.asarray(w, np.float64)
    a = np.asarray(node.a, np.float64)
    b = np.asarray(node.b, np.float64)
    d = a @ b  # (*stack, IN, OUT)
    sizes = lambda axes: [w.shape[ax] for ax in axes]
    d = d.reshape(sizes(node.stack_axes) + sizes(node.in_axes) + sizes(node.out_axes))
    order = list(node.stack_axes) + list(node.in_axes) + list(node.out_axes)
    d = np.transpose(d, [order.index(ax) for ax in range(w.ndim)])
    merged = w + node.scale * d
    if node.magnitude is None:
        return merged
    norm = np.sqrt((merged**2).sum(axis=tuple(node.in_axes), keepdims=True))
    return _magnitude_like(np.asarray(node.magnitude, np.float64), node, w) / norm * merged


def _magnitude_like(m, node, w):
    """(*stack, OUT) magnitude reshaped and transposed to broadcast against w."""
    sizes = [w.shape[ax] for ax in node.stack_axes] + [w.shape[ax] for ax in node.out_axes]
    m = m.reshape(sizes)
    order = list(node.stack_axes) + list(node.out_axes)
    m = m.transpose([order.index(ax) for ax in sorted(order)])
    return m.reshape([w.shape[ax] if ax in order else 1 for ax in range(w.ndim)])


def ref_merge(params, adapter):
    """Independent reference merge: numpy, float64, then back to each leaf's dtype."""
    leaves, tree = jax.tree.flatten(params)
    nodes = tree.flatten_up_to(adapter)
    out = [
        l if n is None else jnp.asarray(ref_weight(l, n), l.dtype) for l, n in zip(leaves, nodes)
    ]
    return jax.tree.unflatten(tree, out)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(params=["masked", "ragged"])
def form(request, monkeypatch):
    """Rows grouped by expert or adapter (``grouped.ragged_low_rank``) as this CPU runs
    them (a masked dense product) and as an accelerator does (``ragged_dot``)."""
    from jlora._src.interpret import grouped

    if request.param == "ragged":
        monkeypatch.setattr(grouped, "DENSE_ON", ())
    return request.param


def ref_merge_jnp(params, adapter):
    """Differentiable reference merge (plain jnp, no jlora code): for gradient checks."""
    leaves, tree = jax.tree.flatten(params)
    nodes = tree.flatten_up_to(adapter)
    out = []
    for w, n in zip(leaves, nodes):
        if n is None:
            out.append(w)
            continue
        sizes = lambda axes: [w.shape[ax] for ax in axes]
        d = jnp.matmul(n.a, n.b).reshape(sizes(n.stack_axes) + sizes(n.in_axes) + sizes(n.out_axes))
        order = list(n.stack_axes) + list(n.in_axes) + list(n.out_axes)
        d = jnp.transpose(d, [order.index(ax) for ax in range(w.ndim)])
        merged = w + (n.scale * d).astype(w.dtype)
        if n.magnitude is not None:  # DoRA: the norm is a constant for the gradient
            norm = jnp.sqrt(
                jnp.sum(
                    jnp.square(merged.astype(jnp.float32)), axis=tuple(n.in_axes), keepdims=True
                )
            )
            merged = (
                _magnitude_like(n.magnitude, n, w) / jax.lax.stop_gradient(norm) * merged
            ).astype(w.dtype)
        out.append(merged)
    return jax.tree.unflatten(tree, out)


def close(actual, expected, tol=F32):
    """allclose for trees, with atol relative to the largest reference value."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale)


def check_against_materialized(fn, params, adapter, *args, tol=F32, jit=True, grad=True):
    """Outputs and adapter gradients of jlora.apply equal those of the merged weight."""
    import jlora

    lora = jlora.apply(fn)
    out_shape = jax.eval_shape(fn, params, *args)
    cot = jax.random.normal(jax.random.key(7), out_shape.shape, jnp.float32)
    loss = lambda ad: jnp.sum(lora(params, ad, *args).astype(jnp.float32) * cot)
    ref_loss = lambda ad: jnp.sum(fn(ref_merge_jnp(params, ad), *args).astype(jnp.float32) * cot)
    wrap = jax.jit if jit else (lambda f: f)
    close(wrap(lora)(params, adapter, *args), fn(ref_merge(params, adapter), *args), tol)
    if grad:
        close(wrap(jax.grad(loss))(adapter), jax.grad(ref_loss)(adapter), tol)


def float_shapes(jaxpr, in_loop=False):
    """(shape, inside a loop body) of every float value any equation produces, recursively."""
    for eqn in jaxpr.eqns:
        loop = in_loop or eqn.primitive.name in ("scan", "while")
        for v in eqn.outvars:
            if jnp.issubdtype(v.aval.dtype, jnp.floating):
                yield tuple(v.aval.shape), in_loop
        for sub in sub_jaxprs(eqn.params):
            yield from float_shapes(sub, loop)


def sub_jaxprs(params):
    """The jaxprs among an equation's params (``jax.extend.core.jaxprs_in_params`` is 0.10+)."""
    for value in params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x
