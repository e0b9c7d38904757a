"""``thin_p``: the two low-rank products ``x A`` and ``t B``, as a JAX primitive.

``thin(spec, t, f)`` is ``contract(spec, t, f)`` (one ``dot_general``), with
differentiation rules of its own. It is bilinear, so forward mode is its
own bind on a tangent (``jax.jvp``, ``jacfwd``, ``hessian`` all work), and its
transpose computes the factor's gradient with the rank axis major: for ``t B``
``dot_general(t, dy)`` (JAX's rule computes ``dot_general(dy, t)``, which XLA's
CPU backend runs by writing the full-size ``dy`` transposed; measured:
``python benchmarks/profile_step.py``), for ``x A`` ``(dt^T x)^T``. A
``custom_vjp`` would do the same for reverse mode but refuse forward mode."""

from __future__ import annotations

import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from jlora._src.numerics import mesh


def contract(
    spec: str, x: jax.Array, y: jax.Array, precision: Any = None, out_spec: tuple | None = None
) -> jax.Array:
    """``jnp.einsum(spec, x, y)`` for two operands whose letters each appear once per
    operand and none only in one operand but not the output: one ``dot_general``
    and at most one transpose (no path search, no nested ``jit``). Under an explicit
    mesh the output is sharded as ``out_spec`` (default: ``mesh.contraction_spec``)."""
    ins, out = spec.split("->")
    xs, ys = ins.split(",")
    if out_spec is None:
        out_spec = mesh.contraction_spec((xs, ys), out, (mesh.spec(x), mesh.spec(y)))
    batch = [c for c in xs if c in ys and c in out]
    summed = [c for c in xs if c in ys and c not in out]
    dims = (
        ([xs.index(c) for c in summed], [ys.index(c) for c in summed]),
        ([xs.index(c) for c in batch], [ys.index(c) for c in batch]),
    )
    dtype = jnp.result_type(x, y)
    got = batch + [c for c in xs if c not in ys] + [c for c in ys if c not in xs]
    sharding = (
        None
        if out_spec is None
        else mesh.named(
            x if mesh.spec(x) is not None else y, tuple(out_spec[out.index(c)] for c in got)
        )
    )
    z = lax.dot_general(
        x.astype(dtype),
        y.astype(dtype),
        dims,
        precision=precision,
        preferred_element_type=dtype,
        out_sharding=sharding,
    )
    return z if got == list(out) else lax.transpose(z, [got.index(c) for c in out])


thin_p = jcore.Primitive("jlora_thin")


def thin(spec: str, precision: Any, t: jax.Array, f: jax.Array) -> jax.Array:
    """``contract(spec, t, f, precision)``, differentiated by the rules below."""
    both = mesh.vma(t) | mesh.vma(f)  # inside shard_map: both vary alike, as JAX's ops need
    return thin_p.bind(mesh.vary(t, both), mesh.vary(f, both), spec=spec, precision=precision)


def _impl(t: jax.Array, f: jax.Array, *, spec: str, precision: Any) -> jax.Array:
    return contract(spec, t, f, precision)


def _abstract(t: Any, f: Any, *, spec: str, precision: Any) -> Any:
    """The output aval: its sharding from the operands' (``mesh.contraction_spec``), its
    varying manual axes (inside ``shard_map``) theirs, as ``dot_general``'s would be."""
    ins, out = spec.split("->")
    (ts, fs) = ins.split(",")
    sizes = dict(zip(ts, t.shape, strict=True)) | dict(zip(fs, f.shape, strict=True))
    like = t if len(mesh.vma(t)) >= len(mesh.vma(f)) else f
    parts = mesh.contraction_spec((ts, fs), out, (mesh.raw_spec(t), mesh.raw_spec(f)))
    assert parts is not None  # (an aval always has a spec, explicit or not)
    return like.update(
        shape=tuple(sizes[c] for c in out),
        weak_type=False,
        dtype=jnp.result_type(t.dtype, f.dtype),
        sharding=NamedSharding(like.sharding.mesh, PartitionSpec(*parts)),
    )


def _dtype(x: Any, like: Any) -> Any:
    aval = getattr(x, "aval", None)
    return like.dtype if aval is None else aval.dtype


def _transpose_t(ct: jax.Array, t: Any, f: jax.Array, *, spec: str, precision: Any) -> jax.Array:
    """The cotangent of ``t``: ``dy`` times the factor, as JAX's rule would."""
    (ts, fs), out = spec.split("->")[0].split(","), spec.split("->")[1]
    return contract(f"{out},{fs}->{ts}", ct, f, precision, mesh.spec(t)).astype(_dtype(t, ct))


def _transpose_f(ct: jax.Array, t: jax.Array, f: Any, *, spec: str, precision: Any) -> jax.Array:
    """The cotangent of the factor, computed with its rank axis major.

    For the first product ``x A`` that is ``(dt^T x)^T``: XLA's CPU backend runs
    ``x^T dt`` (an ``(in, r)`` output) about 4x slower than the same product
    with the ``(r, in)`` output, and would fold a plain transpose back into the
    dot, so an ``optimization_barrier`` keeps the order; the transpose after it
    moves only a factor-sized array (``benchmarks/cpu_kernels.py``).

    Not for a batched product (per-example or per-layer factors): XLA's CPU compiler
    folds the transpose into the batched dot's output layout and then aborts the
    process on small shapes (``dot_op_emitter``: the layout must be dim-0 major), so
    those take the plain product (``tests/test_interpreter_edges.py``; its cost:
    ``benchmarks/batched_factor_grad.py``).
    """
    (ts, fs), out = spec.split("->")[0].split(","), spec.split("->")[1]
    dtype, want = _dtype(f, ct), mesh.spec(f)
    size = dict(zip(ts, jnp.shape(t), strict=True)) | dict(zip(out, jnp.shape(ct), strict=True))
    lead = [c for c in fs if c in ts and c in out]  # batch letters stay first
    of_t, of_ct = ([c for c in fs if c in a and c not in b] for a, b in ((ts, out), (out, ts)))
    if lead or math.prod(size[c] for c in of_t) <= math.prod(size[c] for c in of_ct):
        return contract(f"{ts},{out}->{fs}", t, ct, precision, want).astype(dtype)
    order = "".join(lead + of_ct + of_t)
    part = None if want is None else tuple(want[fs.index(c)] for c in order)
    z = lax.optimization_barrier(contract(f"{out},{ts}->{order}", ct, t, precision, part))
    return lax.transpose(z, [order.index(c) for c in fs]).astype(dtype)


def _batch(args: tuple, dims: tuple, *, spec: str, precision: Any) -> tuple[jax.Array, int]:
    """``vmap``: the mapped axis is one more letter, batch where both operands carry it."""
    (ts, fs), out = spec.split("->")[0].split(","), spec.split("->")[1]
    z = next(c for c in string.ascii_letters if c not in spec)
    specs = []
    for s, d in zip((ts, fs), dims, strict=True):
        specs.append(s if d is None else s[:d] + z + s[d:])  # None: not mapped
    return thin(f"{specs[0]},{specs[1]}->{z}{out}", precision, *args), 0


thin_p.def_impl(_impl)
thin_p.def_abstract_eval(_abstract)
mlir.register_lowering(thin_p, mlir.lower_fun(_impl, multiple_results=False))
ad.defbilinear(thin_p, _transpose_t, _transpose_f)
batching.primitive_batchers[thin_p] = _batch
