"""A mixed batch over a stack of several ranks, each rank class at its own rank.

A stack pads every adapter to the largest rank, so the gather path costs every row
the largest rank's FLOPs. When ``adapter_ids`` are concrete (known when the function
is traced), the rows of each rank class are known too: each class's rows are taken
out (static indices), meet their adapters' factors cut to the class's rank, and go
back in place. The low-rank FLOPs are then the sum of each adapter's own; rows of
the base alone (id -1) compute nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._src.interpret.sym import Sym
from jlora._src.interpret.thin import thin


def low_rank(
    x: jax.Array, sym: Sym, mode: str, sp: dict, ex_axis: int, prec: Any
) -> jax.Array | None:
    """``s (x A) B`` laid out as ``sp['out']`` (:func:`jlora._src.interpret.dot._specs`), or
    None when no row uses an adapter (the caller's gather path then gives zeros)."""
    assert sym.ranked is not None  # (the caller's check: a stack of several ranks)
    ids, ranks = sym.ranked
    per_row = np.repeat(np.asarray(ids), x.shape[ex_axis] // len(ids))
    first, second = (sym.a, sym.b) if mode == "i" else (sym.b, sym.a)
    cut = {id(sym.a): sym.a.ndim - 1, id(sym.b): 1 + sym.count("s")}  # each rank axis
    out_ex = sp["out"].index(sp["ex"])
    pieces, order = [], []
    for r in sorted({ranks[i] for i in per_row if i >= 0}):
        rows = np.nonzero([i >= 0 and ranks[i] == r for i in per_row])[0]
        pick = jnp.asarray(per_row[rows])
        f1, f2 = (
            lax.slice_in_dim(jnp.take(f, pick, axis=0), 0, r, axis=cut[id(f)])
            for f in (first, second)
        )
        t = thin(
            f"{sp['x']},{sp['first']}->{sp['t']}",
            prec,
            jnp.take(x, jnp.asarray(rows), axis=ex_axis).astype(f1.dtype),
            f1,
        )
        if sym.scale != 1.0:
            t = t * jnp.asarray(sym.scale, t.dtype)
        pieces.append(thin(f"{sp['t']},{sp['second']}->{sp['out']}", prec, t, f2))
        order.append(rows)
    if not pieces:
        return None
    rest = np.nonzero(per_row < 0)[0]
    if rest.size:  # the base alone: no low-rank term
        shape = list(pieces[0].shape)
        shape[out_ex] = rest.size
        pieces.append(jnp.zeros(shape, pieces[0].dtype))
        order.append(rest)
    back = np.argsort(np.concatenate(order))
    return jnp.take(jnp.concatenate(pieces, axis=out_ex), jnp.asarray(back), axis=out_ex)
