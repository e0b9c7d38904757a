"""A weight carried symbolically as ``base + s * A @ B``, and the ops it survives.

``Sym`` is what the interpreter keeps in place of an adapted kernel. Its
``labels`` say, for every axis of ``base``, whether it is a stacked axis
(``'s'``), an input axis (``'i'``) or an output axis (``'o'``) and which
dimension of the factors it is: ``a`` is ``(*stack, *in, r)`` and ``b`` is
``(*stack, r, *out)``, both unflattened; with DoRA, ``g = m / ||W0 + s A B||``
is ``(*stack, *out)`` and the weight is ``g * (base + s * A @ B)``. Shape ops that commute with the
factorisation update base, factors and labels together; ``dot_general``
runs factored; everything else calls :func:`materialize`.

In probe mode (``a is None``) the labels are ``('p', original_axis)`` and
the rules only record how the model uses the weight (for ``jlora.init``).
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jlora import qview as qv
from jlora.config import LoraError
from jlora.variants import dora_norm

Label = tuple[str, int]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sym:
    base: Any
    a: Any
    b: Any
    g: Any  # DoRA: magnitude / norm, (*stack, *out); None for plain LoRA
    labels: tuple[Label, ...] = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))
    path: str = dataclasses.field(metadata=dict(static=True))
    ids: Any = None  # mixed batches: per-example adapter index; the factors lead with n

    @property
    def lead(self) -> int:
        """Leading factor axes before the weight's own: 1 (the adapter axis) or 0."""
        return 0 if self.ids is None else 1

    @property
    def probe(self) -> bool:
        return self.a is None

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.labels if k == kind)

    def replace(self, **kw) -> "Sym":
        return dataclasses.replace(self, **kw)


def node_norm(leaf, node) -> jax.Array:
    """DoRA's ``||W0 + s A B||`` per output feature, ``(*stack, *out)`` (``(n, ...)`` for a
    stacked node).

    A constant for the gradient (PEFT, paper 4.3): its inputs are cut from it, so
    no tangent work is traced (and no per-layer weight kept for it)."""
    a, b = (lax.stop_gradient(x) for x in node.unflat()[:2])
    norm = lambda a, b, s: dora_norm(leaf, a, b, s, node.stack_axes, node.in_axes,
                                     node.out_axes)
    if isinstance(node.scale, float):
        return norm(a, b, node.scale)
    return jax.vmap(norm)(a, b, node.scale)


def from_node(leaf, node, path: str, norm=None, ids=None) -> Sym | Any:
    """The symbolic weight for a base leaf and its adapter node (the leaf if none).

    ``norm`` overrides DoRA's norm (unmerge: the base is then the merged weight).
    A stacked node (``jlora.stack``) needs ``ids``, the adapter of each example;
    each adapter's scaling is then folded into its ``b``.
    """
    if node is None:
        return leaf
    a, b, magnitude = node.unflat()
    g = None
    if magnitude is not None:  # DoRA: the norm is a constant for the gradient (PEFT, paper 4.3)
        norm = node_norm(leaf, node) if norm is None else norm
        g = magnitude / lax.stop_gradient(norm).astype(magnitude.dtype)
    scale = node.scale
    if ids is not None:
        b = b * node.scale.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype)
        scale = 1.0
    return Sym(leaf, a, b, g, node.labels(), scale, node.dropout, path, ids)


def _on_base(base, prim, *operands, **params):
    """``prim`` on the base weight: bound, or deferred/narrowed when it is quantized."""
    if qv.is_view(base):
        return qv.op(base, prim, operands, params)
    return prim.bind(base, *operands, **params)


def _value(base):
    return base.value() if qv.is_view(base) else base


def _letters(sym: Sym) -> dict[Label, str]:
    return {lab: string.ascii_letters[i] for i, lab in enumerate(sorted(sym.labels))}


def _factor_specs(sym: Sym, letter: dict[Label, str], r: str) -> tuple[str, str]:
    ls = lambda kind: "".join(letter[(kind, i)] for i in range(sym.count(kind)))
    return ls("s") + ls("i") + r, ls("s") + r + ls("o")


def delta(sym: Sym) -> jax.Array:
    """``A @ B`` laid out like ``base`` (unscaled, in the adapter dtype)."""
    letter = _letters(sym)
    r = string.ascii_letters[len(letter)]
    sa, sb = _factor_specs(sym, letter, r)
    out = "".join(letter[lab] for lab in sym.labels)
    return jnp.einsum(f"{sa},{sb}->{out}", sym.a, sym.b)


def materialize(x, record: Callable | None = None, why: str = ""):
    """``base + s * A @ B`` as a plain array (leaves non-Sym values alone)."""
    if qv.is_view(x):
        return x.value()
    if not isinstance(x, Sym):
        return x
    if record is not None:
        record(x.path, "materialized" + (f" ({why})" if why else ""))
    base = _value(x.base)
    if x.probe:
        return base
    if x.ids is not None:
        raise LoraError(f"a mixed-adapter batch needs {x.path!r} to be used by dot_general "
                        f"(each example its own adapter), but the model's {why or 'use'} needs "
                        "the weight itself; serve these adapters one at a time (or merged)")
    w = base + (x.scale * delta(x)).astype(base.dtype)
    if x.g is None:
        return w
    letter = _letters(x)
    return (w * _broadcast(x.g, _g_spec(x, letter), _spec(x.labels, letter))).astype(w.dtype)


def dematerialize(x: Sym) -> jax.Array:
    """The base ``W0`` for which :func:`materialize` gives ``x.base`` (unmerge)."""
    w = x.base
    if x.g is not None:
        letter = _letters(x)
        w = (w / _broadcast(x.g, _g_spec(x, letter), _spec(x.labels, letter))).astype(w.dtype)
    return w - (x.scale * delta(x)).astype(w.dtype)


def _spec(labels, letter) -> str:
    return "".join(letter[lab] for lab in labels)


def _g_spec(sym: Sym, letter) -> str:
    return "".join(letter[(k, i)] for k in "so" for i in range(sym.count(k)))


def _broadcast(arr, spec: str, out: str):
    """``arr`` (letters ``spec``, all in ``out``) transposed and expanded to ``out``'s rank."""
    order = [c for c in out if c in spec]
    arr = jnp.transpose(arr, [spec.index(c) for c in order])
    return arr.reshape([arr.shape[order.index(c)] if c in spec else 1 for c in out])


# ----- shape ops that keep the factorisation -------------------------------------------

def _factor_axis(sym: Sym, label: Label) -> list[tuple[str, int]]:
    """Which (factor, dim) pairs hold the axis with this label."""
    kind, idx = label
    ns, k = sym.count("s"), sym.lead
    if kind == "s":
        return [("a", k + idx), ("b", k + idx), ("g", k + idx)]
    return ([("a", k + ns + idx)] if kind == "i"
            else [("b", k + ns + 1 + idx), ("g", k + ns + idx)])


def _on_factors(sym: Sym, label: Label, op: Callable[[jax.Array, int], jax.Array]) -> dict:
    new = {"a": sym.a, "b": sym.b, "g": sym.g}
    if not sym.probe:
        for name, dim in _factor_axis(sym, label):
            if new[name] is not None:
                new[name] = op(new[name], dim)
    return new


def transpose(sym: Sym, permutation) -> Sym:
    return sym.replace(base=_on_base(sym.base, lax.transpose_p, permutation=permutation),
                       labels=tuple(sym.labels[p] for p in permutation))


def convert(sym: Sym, new_dtype, **params) -> Sym | None:
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        return None
    return sym.replace(base=_on_base(sym.base, lax.convert_element_type_p, new_dtype=new_dtype,
                                     **params))


def _drop_label(labels, removed: Label):
    kind, idx = removed
    return tuple((k, i - (k == kind and i > idx)) for k, i in labels)


def squeeze(sym: Sym, dimensions, record) -> Sym:
    out = sym
    for d in sorted(dimensions, reverse=True):
        label = out.labels[d]
        if out.probe:
            record(out.path, ("index", label[1]))
        factors = _on_factors(out, label, lambda f, dim: lax.squeeze(f, (dim,)))
        labels = out.labels[:d] + out.labels[d + 1:]
        labels = labels if out.probe else _drop_label(labels, label)
        out = out.replace(base=_on_base(out.base, lax.squeeze_p, dimensions=(d,)), labels=labels,
                          **factors)
    return out


def slice_(sym: Sym, start_indices, limit_indices, strides) -> Sym:
    out = sym.replace(base=_on_base(sym.base, lax.slice_p, start_indices=start_indices,
                                    limit_indices=limit_indices, strides=strides))
    for ax, (lo, hi) in enumerate(zip(start_indices, limit_indices)):
        st = 1 if strides is None else strides[ax]
        if (lo, hi, st) != (0, sym.base.shape[ax], 1):
            out = out.replace(**_on_factors(
                out, sym.labels[ax], lambda f, d: lax.slice_in_dim(f, lo, hi, st, axis=d)))
    return out


def dynamic_slice(sym: Sym, starts, slice_sizes) -> Sym:
    out = sym.replace(base=_on_base(sym.base, lax.dynamic_slice_p, *starts,
                                    slice_sizes=tuple(slice_sizes)))
    for ax, (start, size) in enumerate(zip(starts, slice_sizes)):
        if size != sym.base.shape[ax]:
            out = out.replace(**_on_factors(
                out, sym.labels[ax],
                lambda f, d: lax.dynamic_slice_in_dim(f, start, size, axis=d)))
    return out


def expand(sym: Sym, shape, broadcast_dimensions, **params) -> Sym | None:
    """``broadcast_in_dim`` that only inserts size-1 axes: new stacked axes."""
    if math.prod(shape) != sym.base.size or list(broadcast_dimensions) != sorted(
            broadcast_dimensions) or sym.probe:
        return None
    base = _on_base(sym.base, lax.broadcast_in_dim_p, shape=shape,
                    broadcast_dimensions=broadcast_dimensions, **params)
    labels, a, b, g, ns = [], sym.a, sym.b, sym.g, sym.count("s")
    old = iter(sym.labels)
    for ax in range(len(shape)):
        if ax in broadcast_dimensions:
            labels.append(next(old))
        else:
            labels.append(("s", ns))
            a, b = jnp.expand_dims(a, sym.lead + ns), jnp.expand_dims(b, sym.lead + ns)
            g = None if g is None else jnp.expand_dims(g, sym.lead + ns)
            ns += 1
    return sym.replace(base=base, a=a, b=b, g=g, labels=tuple(labels))


def _reshape_groups(old, new):
    """Pair runs of old and new axes with equal products, or None."""
    groups, i, j = [], 0, 0
    while i < len(old) and j < len(new):
        gi, gj, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn and i < len(old):
                gi.append(i)
                po, i = po * old[i], i + 1
            elif pn < po and j < len(new):
                gj.append(j)
                pn, j = pn * new[j], j + 1
            else:
                return None
        groups.append((gi, gj))
    return groups if (i, j) == (len(old), len(new)) else None


def reshape(sym: Sym, new_sizes, dimensions=None, **params) -> Sym | None:
    """Merges/splits of adjacent axes of one kind that are adjacent in the factors too."""
    groups = _reshape_groups(sym.base.shape, tuple(new_sizes))
    if dimensions is not None or groups is None or sym.probe:
        return None
    blocks: dict[str, list] = {"s": [], "i": [], "o": []}
    for gi, gj in groups:
        kind, first = sym.labels[gi[0]]
        if any(sym.labels[g] != (kind, first + n) for n, g in enumerate(gi)):
            return None
        blocks[kind].append((first, gj))
    labels: list = [None] * len(new_sizes)
    sizes: dict[str, list] = {}
    for kind, found in blocks.items():
        sizes[kind] = []
        for _, gj in sorted(found):
            for g in gj:
                labels[g] = (kind, len(sizes[kind]))
                sizes[kind].append(new_sizes[g])
    r = sym.a.shape[-1]
    n = sym.a.shape[:sym.lead]
    a = sym.a.reshape(*n, *sizes["s"], *sizes["i"], r)
    b = sym.b.reshape(*n, *sizes["s"], r, *sizes["o"])
    g = None if sym.g is None else sym.g.reshape(*n, *sizes["s"], *sizes["o"])
    base = _on_base(sym.base, lax.reshape_p, new_sizes=tuple(new_sizes), dimensions=None,
                    **params)
    return sym.replace(base=base, a=a, b=b, g=g, labels=tuple(labels))
