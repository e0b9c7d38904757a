"""A weight carried symbolically as ``base + s * A @ B``, and the ops it survives.

``Sym`` is what the interpreter keeps in place of an adapted kernel. Its
``labels`` say, for every axis of ``base``, whether it is a stacked axis
(``'s'``), an input axis (``'i'``) or an output axis (``'o'``) and which
dimension of the factors it is: ``a`` is ``(*stack, *in, r)`` and ``b`` is
``(*stack, r, *out)``, both unflattened; with DoRA, ``g = m / ||W0 + s A B||``
is ``(*stack, *out)`` and the weight is ``g * (base + s * A @ B)``. Shape ops that commute with the
factorisation update base, factors and labels together (``shape.py``);
``dot_general`` runs factored (``dot.py``); everything else calls :func:`materialize`.

A :class:`Probe` is the other symbolic value: ``jlora.init``'s weight whose axes are not
known yet. It has no factors, its labels are ``('p', original_axis)`` (a tuple of them
after a reshape merged axes, :func:`originals`), and its own rules (``core.register(...,
on=Probe)``) only record how the model uses it.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive

from jlora._src.adapter import LoraNode, StackedNode
from jlora._src.config import LoraError
from jlora._src.interpret import quantized
from jlora._src.interpret.thin import thin
from jlora._src.interpret.uses import Use
from jlora._src.numerics import qview as qv
from jlora._src.numerics.dora import dora_norm

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
    #: Some layers only (``LayersNode``): per index of the stacked axis ("s", 0), whether
    #: that layer is adapted (the others have zero factors, and a scan skips them).
    active: tuple[bool, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    #: The node's ``axes_from`` (``jlora._src.adapter.AXES_FROM``): whether a use that swaps the
    #: factors' roles is expected (learned, a tied table) or refused (``"assumed"``).
    axes_from: str = dataclasses.field(default="flax", metadata=dict(static=True))
    #: A mixed batch of a stack with several ranks, its ``adapter_ids`` concrete: each
    #: example's adapter and each adapter's rank, so each rank class runs at its own rank.
    ranked: tuple[tuple[int, ...], tuple[int, ...]] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )

    @property
    def lead(self) -> int:
        """Leading factor axes before the weight's own: 1 (the adapter axis) or 0."""
        return 0 if self.ids is None else 1

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.labels if k == kind)

    def replace(self, **kw: Any) -> Sym:
        def stacked(labels: Sequence[Label]) -> list[Label]:
            return sorted(lab for lab in labels if lab[0] == "s")

        if (
            self.active is not None
            and "labels" in kw
            and stacked(kw["labels"]) != stacked(self.labels)
        ):
            kw["active"] = None  # a stacked axis went: ("s", 0) may now name another
        return dataclasses.replace(self, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probe(Sym):
    """``jlora.init``'s value for a weight whose stacked/in/out axes are being learned: the
    base alone, labelled with its original axes; the rules registered ``on=Probe`` record
    each use (``jlora._src.interpret.probe`` reads the records)."""

    @classmethod
    def of(cls, base: Any, path: str) -> Probe:
        labels = tuple(("p", ax) for ax in range(base.ndim))
        return cls(base, None, None, None, labels, 0.0, 0.0, path)


def check_assumed(sym: Sym, contracted: Sequence[int]) -> None:
    """Refuse a use that contracts out-axes of factors whose layout was assumed
    (``axes_from="assumed"``: the model keeps the weight transposed against that
    assumption, torch's ``(out, in)``, so the file's update would land transposed), or of
    a PEFT embedding adapter that PEFT applies at lookups only (``"lookup"``)."""
    if (
        sym.axes_from not in ("assumed", "lookup")  # (a probe's are "flax")
        or not any(sym.labels[ax][0] == "o" for ax in contracted)
    ):
        return
    if sym.axes_from == "lookup":
        raise LoraError(
            f"{sym.path!r}: the model also uses this table as its output head (x @ E.T), but "
            "the PEFT file's embedding adapter was saved with ensure_weight_tying=False, so "
            "PEFT applied it where the table is looked up and not at the tied head; jlora "
            "applies a table's adapter at every use. To reproduce PEFT give the head its own "
            "copy of the table in params (an untied lm_head), or train the adapter with "
            "ensure_weight_tying=True"
        )
    raise LoraError(
        f"{sym.path!r}: the model contracts the axes that peft.load took as the weight's "
        "out axes (x @ W.T: a torch (out, in) layout?), so the PEFT file's update would be "
        "applied transposed; peft.load assumed Flax's (in, out) layout because it had no "
        "model to learn from: load it with jlora.peft.load(path, params, fn, *example_args) "
        "(or axes={path: (stack_axes, in_axes, out_axes)})"
    )


def node_norm(leaf: Any, node: LoraNode | StackedNode) -> jax.Array:
    """DoRA's ``||W0 + s A B||`` per output feature, ``(*stack, *out)`` (``(n, ...)`` for a
    stacked node).

    A constant for the gradient (PEFT, paper 4.3): its inputs are cut from it, so
    no tangent work is traced (and no per-layer weight kept for it)."""
    a, b = (lax.stop_gradient(x) for x in node.unflat()[:2])

    def norm(a: jax.Array, b: jax.Array, s: float | jax.Array) -> jax.Array:
        return dora_norm(leaf, a, b, s, node.stack_axes, node.in_axes, node.out_axes)

    if isinstance(node.scale, float):
        return norm(a, b, node.scale)
    return jax.vmap(norm)(a, b, jnp.asarray(node.scale, jnp.float32))


def from_node(
    leaf: Any,
    node: LoraNode | StackedNode | None,
    path: str,
    norm: jax.Array | None = None,
    ids: jax.Array | None = None,
    active: tuple[bool, ...] | None = None,
    rows: tuple | None = None,
) -> Sym | Any:
    """The symbolic weight for a base leaf and its adapter node (the leaf if none).

    ``norm`` overrides DoRA's norm (unmerge: the base is then the merged weight).
    A stacked node (``jlora.stack``) needs ``ids``, the adapter of each example;
    each adapter's scaling is then folded into its ``b``. ``rows``: the same ids as a
    tuple when they are concrete (a stack of several ranks then runs each at its own).
    """
    if node is None:
        return leaf
    a, b, magnitude = node.unflat()
    g = None
    if magnitude is not None:  # DoRA: the norm is a constant for the gradient (PEFT, paper 4.3)
        norm = node_norm(leaf, node) if norm is None else norm
        g = magnitude / lax.stop_gradient(norm).astype(magnitude.dtype)
        if active is not None:  # layers without factors: exactly W0
            mask = jnp.asarray(active).reshape((-1,) + (1,) * (g.ndim - 1))
            g = jnp.where(mask, g, jnp.ones((), g.dtype))
    scale: Any = node.scale  # (a stack's: one per adapter)
    if ids is not None and len(set(scale)) == 1:  # one scaling for all: the thin t takes it
        scale = scale[0]
    elif ids is not None:
        b = b * jnp.asarray(node.scale, b.dtype).reshape((-1,) + (1,) * (b.ndim - 1))
        scale = 1.0
    ranks = getattr(node, "ranks", ())
    ranked = (rows, ranks) if rows is not None and g is None and len(set(ranks)) > 1 else None
    return Sym(
        leaf, a, b, g, node.labels(), scale, node.dropout, path, ids, active, node.axes_from, ranked
    )


def on_base(base: Any, prim: Primitive, *operands: Any, **params: Any) -> Any:
    """``prim`` on the base weight: bound, or deferred/narrowed when it is quantized."""
    if qv.is_view(base):
        return quantized.op(base, prim, operands, params)
    return prim.bind(base, *operands, **params)


def a_as_base(sym: Sym) -> jax.Array:
    """``A (*in, r)`` laid out like the (unstacked, one out axis) base weight, ``r`` where
    its out axis is: what an op that reads the weight as a whole (a lookup, a
    convolution) can run on ``A`` in place of ``W0`` to get the rank-r intermediate."""
    return jnp.transpose(sym.a, [j if k != "o" else sym.count("i") for k, j in sym.labels])


def times_b(sym: Sym, t: jax.Array, axis: int, precision: Any = None) -> jax.Array:
    """``s * t B`` contracting ``t``'s rank axis ``axis``; ``B``'s out axis takes its place."""
    if sym.scale != 1.0:  # scale the thin intermediate, not the full-size output
        t = t * jnp.asarray(sym.scale, t.dtype)
    ls = string.ascii_letters[: t.ndim]
    r, o = string.ascii_letters[t.ndim], string.ascii_letters[t.ndim + 1]
    out = ls[:axis] + o + ls[axis + 1 :]
    return thin(f"{ls[:axis]}{r}{ls[axis + 1 :]},{r}{o}->{out}", precision, t, sym.b)


def value(base: Any) -> Any:
    return base.value() if qv.is_view(base) else base


def letters(sym: Sym) -> dict[Label, str]:
    return {lab: string.ascii_letters[i] for i, lab in enumerate(sorted(sym.labels))}


def factor_specs(sym: Sym, letter: dict[Label, str], r: str) -> tuple[str, str]:
    def ls(kind: str) -> str:
        return "".join(letter[(kind, i)] for i in range(sym.count(kind)))

    return ls("s") + ls("i") + r, ls("s") + r + ls("o")


def delta(sym: Sym) -> jax.Array:
    """``A @ B`` laid out like ``base`` (unscaled, in the adapter dtype)."""
    letter = letters(sym)
    r = string.ascii_letters[len(letter)]
    sa, sb = factor_specs(sym, letter, r)
    out = "".join(letter[lab] for lab in sym.labels)
    return jnp.einsum(f"{sa},{sb}->{out}", sym.a, sym.b)


def materialize(x: Any, record: Callable | None = None, why: str = "") -> Any:
    """``base + s * A @ B`` as a plain array (leaves non-Sym values alone)."""
    if qv.is_view(x):
        return x.value()
    if not isinstance(x, Sym):
        return x
    if record is not None:
        record(x.path, Use("materialized", why))
    base = value(x.base)
    if isinstance(x, Probe):
        return base
    if x.ids is not None:
        raise LoraError(
            f"a mixed-adapter batch needs {x.path!r} to be used by dot_general "
            f"(each example its own adapter), but the model's {why or 'use'} needs "
            "the weight itself; serve these adapters one at a time (or merged)"
        )
    w = base + (x.scale * delta(x)).astype(base.dtype)
    if x.g is None:
        return w
    letter = letters(x)
    return (w * broadcast(x.g, g_spec(x, letter), _labels_spec(x.labels, letter))).astype(w.dtype)


def dematerialize(x: Sym) -> jax.Array:
    """The base ``W0`` for which :func:`materialize` gives ``x.base`` (unmerge)."""
    w = x.base
    if x.g is not None:
        letter = letters(x)
        w = (w / broadcast(x.g, g_spec(x, letter), _labels_spec(x.labels, letter))).astype(w.dtype)
    return w - (x.scale * delta(x)).astype(w.dtype)


def _labels_spec(labels: Sequence[Label], letter: dict) -> str:
    return "".join(letter[lab] for lab in labels)


def g_spec(sym: Sym, letter: dict) -> str:
    return "".join(letter[(k, i)] for k in "so" for i in range(sym.count(k)))


def broadcast(arr: jax.Array, spec: str, out: str) -> jax.Array:
    """``arr`` (letters ``spec``, all in ``out``) transposed and expanded to ``out``'s rank."""
    order = [c for c in out if c in spec]
    arr = jnp.transpose(arr, [spec.index(c) for c in order])
    return arr.reshape([arr.shape[order.index(c)] if c in spec else 1 for c in out])


def factor_dims(sym: Sym, label: Label) -> dict[str, int]:
    """Which dim of each factor (``a``, ``b``, DoRA's ``g``) holds the axis ``label``."""
    kind, idx = label
    ns, k = sym.count("s"), sym.lead
    if kind == "s":
        return {"a": k + idx, "b": k + idx, "g": k + idx}
    return {"a": k + ns + idx} if kind == "i" else {"b": k + ns + 1 + idx, "g": k + ns + idx}


def unit_as(sym: Sym, ax: int, kind: str) -> Sym:
    """``sym`` with its size-1 axis ``ax`` given the role ``kind`` (a size-1 axis can play
    any: a depthwise kernel's input-feature axis comes out of a reshape as "out")."""
    old = sym.labels[ax]
    if old[0] == kind or sym.base.shape[ax] != 1:
        return sym
    f = {"a": sym.a, "b": sym.b, "g": sym.g}
    for name, dim in factor_dims(sym, old).items():
        f[name] = None if f[name] is None else jnp.squeeze(f[name], dim)
    labels = list(drop_label(sym.labels, old))
    labels[ax] = (kind, sum(1 for j, (k, _) in enumerate(labels) if k == kind and j != ax))
    moved = sym.replace(labels=tuple(labels), **f)  # factors now one dim short for ``kind``
    for name, dim in factor_dims(moved, labels[ax]).items():
        if f[name] is not None:
            f[name] = jnp.expand_dims(f[name], dim)
    return moved.replace(**f)


def originals(label: Label) -> tuple[int, ...]:
    """Probe mode: the original axes an axis holds (``("p", ax)``; after a reshape merged
    axes, ``("p", (ax, ...))``; an inserted size-1 axis holds none)."""
    held = label[1]
    return held if isinstance(held, tuple) else (held,)


def drop_label(labels: Sequence[Label], removed: Label) -> tuple[Label, ...]:
    """``labels`` after the axis ``removed`` is gone: later axes of its kind move down."""
    kind, idx = removed
    return tuple((k, i - (k == kind and i > idx)) for k, i in labels)


def reshape_groups(
    old: tuple[int, ...], new: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
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
