"""The ``conv_general_dilated`` rule: an adapted convolution kernel, computed factored.

A kernel's spatial and input-feature axes are "in", its output-feature axis
"out", as in PEFT's conv LoRA (``lora_A`` a convolution ``in -> r`` with the
layer's kernel size, ``lora_B`` a 1x1 convolution ``r -> out``). Convolution is
linear in the kernel, so ``conv(x, W0 + s A B) = conv(x, W0) + s conv(x, A) B``:
``A`` laid out as a kernel with ``r`` output features goes through the layer's
own convolution (any dimension numbers, strides, padding, dilation), then one
thin product with ``B`` over the feature axis; DoRA scales each output feature
by ``g`` as the dot rule does. A grouped (or depthwise) convolution with ``G``
groups runs ``A`` once per group (``A`` tiled ``G`` times, the layer's own
``feature_group_count``), and each output feature takes ``B`` on its own
group's rank-r block. ``batch_group_count`` and mixed-adapter batches
materialize and say why.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import JaxprEqn

from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, bind, has_sym, materialized, register
from jlora._src.interpret.dot import _dropout
from jlora._src.interpret.sym import Probe, Sym
from jlora._src.interpret.thin import thin
from jlora._src.interpret.uses import FACTORED


def _why_not(eqn: JaxprEqn, w: Sym) -> str | None:
    p, rhs = eqn.params, eqn.params["dimension_numbers"].rhs_spec
    if p["batch_group_count"] != 1:
        return "convolution with batch_group_count"
    if (
        w.labels[rhs[0]][0] != "o"
        or w.count("o") != 1
        or w.count("s")
        or any(w.labels[ax][0] != "i" for ax in rhs[1:])
    ):
        return "convolution kernel whose adapter is not (spatial, in) -> out"
    if w.ids is not None:
        return "convolution in a mixed-adapter batch"
    return None


@register(lax.conv_general_dilated_p, on=Probe)
def _probe_conv(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A probed kernel convolved: its input-feature and spatial axes are contracted."""
    x, w = invals
    if not isinstance(w, Probe) or has_sym([x]):
        return conv(eqn, invals, ctx)
    rhs = eqn.params["dimension_numbers"].rhs_spec
    ctx.record(w.path, ("dot", tuple(w.labels[ax][1] for ax in rhs[1:]), ()))
    return bind(eqn, [x, sy.value(w.base)])


@register(lax.conv_general_dilated_p)
def conv(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    x, w = invals
    if not isinstance(w, Sym) or has_sym([x]):
        return bind(eqn, materialized(invals, ctx, "convolution of an adapted input"))
    base_out = bind(eqn, [x, sy.value(w.base)])
    rhs = eqn.params["dimension_numbers"].rhs_spec
    sy.check_assumed(w, rhs[1:])
    for ax, kind in zip(
        rhs, "o" + "i" * (len(rhs) - 1), strict=True
    ):  # a size-1 axis plays any role
        w = sy.unit_as(w, ax, kind)
    why = _why_not(eqn, w)
    if why is not None:
        return bind(eqn, [x, sy.materialize(w, ctx.record, why)])
    ctx.record(w.path, FACTORED)
    groups = eqn.params["feature_group_count"]
    a = sy.a_as_base(w)  # a kernel with r output features (G r: one block per group)
    a = jnp.concatenate([a] * groups, axis=rhs[0]) if groups > 1 else a
    x_d = _dropout(x, w.dropout, ctx.key)
    t = bind(eqn, [x_d.astype(a.dtype), a])
    feat = eqn.params["dimension_numbers"].out_spec[1]  # the output's feature axis
    y = _times_b(w, t, feat, groups, eqn.params.get("precision")).astype(base_out.dtype)
    if w.g is None:
        return base_out + y
    # DoRA (PEFT's): g = m / ||W0 + s A B|| per output feature, as in the dot rule
    g = w.g.reshape([-1 if ax == feat else 1 for ax in range(y.ndim)]).astype(y.dtype)
    if x_d is x:
        return g * (base_out + y)
    return base_out + (g - 1) * bind(eqn, [x_d, sy.value(w.base)]) + g * y


def _times_b(w: Sym, t: jax.Array, feat: int, groups: int, precision: Any) -> jax.Array:
    """``s t B`` over the feature axis; with groups, output feature ``o`` of group ``k``
    takes ``t``'s block ``k`` (``(..., G, r) x (r, G, out/G)``)."""
    if groups == 1:
        return sy.times_b(w, t, feat, precision)
    t = jnp.moveaxis(t, feat, -1)
    lead, r = t.shape[:-1], w.b.shape[0]
    b = w.b.reshape(r, groups, -1)
    if w.scale != 1.0:
        t = t * jnp.asarray(w.scale, t.dtype)
    y = thin(
        "...gr,rgo->...go".replace("...", _LEAD[: len(lead)]),
        precision,
        t.reshape(*lead, groups, r),
        b,
    )
    return jnp.moveaxis(y.reshape(*lead, -1), -1, feat)


_LEAD = "ABCDEFGH"
