"""The ``ragged_dot`` rule: mixture-of-experts weights ``(experts, in, out)``, factored.

``lax.ragged_dot(x, W, group_sizes)`` multiplies each run of rows of ``x`` by its
expert's matrix. With ``W = W0 + s A B``, ``A (experts, in, r)``, ``B (experts,
r, out)`` (the expert axis "stacked"), that is ``ragged_dot(x, W0) + s *
ragged_dot(ragged_dot(x, A), B)``: two thin ragged products, the same groups. DoRA
experts rescale each row's output by its own expert's ``g = m / ||W0 + s A B||``
(``(experts, out)``, picked per row by its group), PEFT's formula as in the dot rule.
Other layouts and mixed-adapter batches materialize and say why.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import JaxprEqn

from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, bind, has_sym, materialized, register
from jlora._src.interpret.dot import _dropout
from jlora._src.interpret.grouped import ragged_low_rank, row_groups
from jlora._src.interpret.sym import Probe, Sym
from jlora._src.interpret.uses import FACTORED
from jlora._src.numerics import mesh

_EXPERTS = (("s", 0), ("i", 0), ("o", 0))


def _standard(eqn: JaxprEqn, lhs: Any, rhs: Any) -> bool:
    """``(tokens, in) x (experts, in, out)`` grouped along the tokens, no group offset."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    return (
        len(lhs.shape) == 2
        and rhs.base.ndim == 3
        and len(eqn.invars) == 3
        and tuple(map(tuple, dn.dot_dimension_numbers[0])) == ((1,), (1,))
        and tuple(map(tuple, dn.dot_dimension_numbers[1])) == ((), ())
        and tuple(dn.lhs_ragged_dimensions) == (0,)
        and tuple(dn.rhs_group_dimensions) == (0,)
    )


def _why_not(eqn: JaxprEqn, lhs: Any, rhs: Any) -> str | None:
    if not _standard(eqn, lhs, rhs):
        return "ragged_dot that is not (tokens, in) x (experts, in, out)"
    if rhs.labels != _EXPERTS:
        return "ragged_dot of a kernel whose adapter is not (experts, in, out)"
    if rhs.ids is not None:
        return "ragged_dot in a mixed-adapter batch"
    return None


@register(names=("ragged_dot_general",), on=Probe)
def _probe_ragged_dot(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A probed expert stack: its in axis contracted, its expert axis batched."""
    lhs, rhs, sizes = invals[0], invals[1], invals[2]
    if not isinstance(rhs, Probe) or has_sym([lhs, sizes, *invals[3:]]):
        return ragged_dot(eqn, invals, ctx)
    if _standard(eqn, lhs, rhs):
        ctx.record(rhs.path, ("dot", (rhs.labels[1][1],), (rhs.labels[0][1],)))
    return bind(eqn, [lhs, sy.value(rhs.base), sizes])


@register(names=("ragged_dot_general",))
def ragged_dot(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    lhs, rhs, sizes = invals[0], invals[1], invals[2]
    if not isinstance(rhs, Sym) or has_sym([lhs, sizes, *invals[3:]]):
        return bind(eqn, materialized(invals, ctx, "ragged_dot of an adapted input"))
    base_out = bind(eqn, [lhs, sy.value(rhs.base), sizes])
    if _standard(eqn, lhs, rhs):
        sy.check_assumed(rhs, (1,))
    why = _why_not(eqn, lhs, rhs)
    if why is not None:
        return bind(eqn, [lhs, sy.materialize(rhs, ctx.record, why), sizes])
    ctx.record(rhs.path, FACTORED)
    prec = eqn.params.get("precision")
    x = _dropout(lhs, rhs.dropout, ctx.key)
    out_sharding = eqn.params.get("out_sharding")
    y = ragged_low_rank(x.astype(rhs.a.dtype), rhs.a, rhs.b, sizes, rhs.scale, prec, out_sharding)
    if rhs.g is None:
        return base_out + y.astype(base_out.dtype)
    g = _row_g(rhs.g, sizes, lhs.shape[0])
    if x is lhs:
        return (g * (base_out + y)).astype(base_out.dtype)
    dropped = bind(eqn, [x, sy.value(rhs.base), sizes])
    return (base_out + (g - 1) * dropped + g * y).astype(base_out.dtype)


def _row_g(g: jax.Array, sizes: jax.Array, rows: int) -> jax.Array:
    """DoRA's ``g (experts, out)`` for each of the ``rows`` rows, by its group (rows past
    the groups get the last expert's: ``ragged_dot`` gives them zeros anyway)."""
    return jnp.take(mesh.replicated(g), row_groups(sizes, rows), axis=0, mode="clip")
