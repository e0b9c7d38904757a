"""DoRA's weight norm, computed from the factors without forming ``W0 + s*A@B``.

``||W0 + s A B||`` over the input axes, per output feature, expands to
``sum W0^2 + 2 s <A^T W0, B> + s^2 <B, (A^T A) B>``: the largest temporary is
``A^T W0`` of shape ``(*stack, r, *out)``, never a full-size matrix.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jlora._src.numerics import mesh
from jlora._src.numerics import qview as qv
from jlora._src.targets import Leaf


def dora_norm(
    w: Leaf,
    a_u: jax.Array,
    b_u: jax.Array,
    scale: float | jax.Array,
    stack_axes: Sequence[int],
    in_axes: Sequence[int],
    out_axes: Sequence[int],
) -> jax.Array:
    """Column norm of ``W0 + s * A @ B`` over ``in_axes``, shaped ``(*stack, *out)``.

    Args:
      w: the base kernel, in its own axis order; an NF4 kernel is dequantized one
        leading stacked layer at a time.
      a_u: ``(*stack, *in, r)``; b_u: ``(*stack, r, *out)`` (unflattened factors).
      scale: the LoRA scaling ``s``.
      stack_axes, in_axes, out_axes: which axes of ``w`` play which role.
    """
    w = qv.wrap(w)
    if qv.is_view(w):
        if stack_axes and stack_axes[0] == 0 and not w.ops:  # one layer at a time

            def less(axes: Sequence[int]) -> tuple[int, ...]:
                return tuple(ax - 1 for ax in axes)

            def layer(i: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
                return dora_norm(
                    w.index(i), a, b, scale, less(stack_axes[1:]), less(in_axes), less(out_axes)
                )

            return lax.map(lambda t: layer(*t), (jnp.arange(w.shape[0]), a_u, b_u))
        w = w.value()
    letter = string.ascii_letters
    w_spec = letter[: w.ndim]
    S = "".join(letter[ax] for ax in stack_axes)
    IN = "".join(letter[ax] for ax in in_axes)
    OUT = "".join(letter[ax] for ax in out_axes)
    r, q = letter[w.ndim], letter[w.ndim + 1]
    w, a, b = (x.astype(jnp.float32) for x in (w, a_u, b_u))
    squares = mesh.einsum(f"{w_spec},{w_spec}->{S}{OUT}", w, w)
    atw = mesh.einsum(f"{w_spec},{S}{IN}{r}->{S}{r}{OUT}", w, a)
    cross = mesh.einsum(f"{S}{r}{OUT},{S}{r}{OUT}->{S}{OUT}", atw, b)
    gram = mesh.einsum(f"{S}{IN}{r},{S}{IN}{q}->{S}{r}{q}", a, a)
    quad = mesh.einsum(f"{S}{r}{OUT},{S}{r}{q},{S}{q}{OUT}->{S}{OUT}", b, gram, b)
    return jnp.sqrt(jnp.maximum(squares + 2 * scale * cross + scale * scale * quad, 0.0))
