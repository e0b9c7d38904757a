"""``apply`` and ``explain``: run any JAX function with LoRA computed factored.

``fn`` is traced once with the base parameters; the jaxpr is then evaluated by
the interpreter (:mod:`jlora._src.interpret`) with each adapted kernel carried as
``base + s * A @ B``. Only ordinary JAX ops are emitted, so ``jit``, ``grad``,
``vmap`` and sharding compose as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jlora._src.adapter import Adapter, FullNode, adapter_nodes, match
from jlora._src.config import LoraError
from jlora._src.interpret import example_axis, grouped, token_axes
from jlora._src.interpret.concat import by_path
from jlora._src.interpret.core import Ctx, evaluate, materialized
from jlora._src.interpret.mixed import check_ids, example_layout
from jlora._src.interpret.sym import from_node
from jlora._src.interpret.trace import trace
from jlora._src.interpret.uses import Use
from jlora._src.numerics import qview as qv
from jlora._src.targets import Params, flatten, path_str
from jlora._src.transforms import whole_leaves
from jlora._src.transforms.alora import check_mask, ungated
from jlora._src.transforms.check import check_finite


def interpret_call(
    fn: Callable,
    params: Params,
    adapter: Adapter,
    call: tuple,
    ctx: Ctx,
    adapter_ids: ArrayLike | None = None,
    example_axes: int | Sequence[int | None] | None = None,
) -> Any:
    """``fn(params, *args, **kwargs)`` (``call`` is ``(args, kwargs)``) interpreted with
    ``adapter``'s factors; ``ctx`` collects the use records."""
    args, kwargs = call
    nodes = match(params, adapter)
    ids = check_ids(nodes, adapter_ids)
    check_mask(nodes, ctx.mask)
    closed, out_tree, dyn = trace(fn, params, args, kwargs)
    flat = flatten(params)[0]
    if ids is not None:  # follow each argument's example axis to every adapted dot
        layout = [None] * len(flat) + example_layout(args, kwargs, ids.shape[0], example_axes)
        ctx.examples = example_axis.analyze(closed.jaxpr, layout, ctx.expanded)
    if ctx.mask is not None:  # follow the mask's axes (batch, seq) to every adapted dot
        layout = [token_axes.NONE] * len(flat) + token_axes.layout(args, kwargs, ctx.mask.shape)
        ctx.tokens = token_axes.analyze(closed.jaxpr, layout, ctx.expanded)
    lowered = [
        whole_leaves.lower(leaf, node, exact=False)
        for (_, leaf), node in zip(flat, nodes, strict=True)
    ]
    rows = (
        None
        if ids is None or isinstance(adapter_ids, jax.core.Tracer)
        else tuple(np.asarray(adapter_ids).astype(int).tolist())
    )  # known now: see interpret.ranked
    syms = [
        from_node(
            qv.wrap(leaf), node, path_str(kp), ids=ids, active=whole_leaves.active(orig), rows=rows
        )
        for (kp, _), (leaf, node), orig in zip(flat, lowered, nodes, strict=True)
    ]
    vals = syms + dyn[len(syms) :]
    outs = evaluate(closed.jaxpr, closed.consts, vals, ctx)
    if ctx.mask is not None:
        ungated(ctx.records)
    return jax.tree_util.tree_unflatten(out_tree, materialized(outs, ctx, "returned"))


def apply(fn: Callable, *, safe: bool = False, mixed: str = "auto") -> Callable:
    """Turn ``fn(params, *args)`` into ``f(params, adapter, *args, lora_rng=None,
    adapter_ids=None, **kwargs)``.

    Adapted kernels are computed factored: ``x @ W0 + s * (dropout(x) @ A) @ B``,
    never forming the full-size weight or its gradient. Dropout (the adapter's
    rate, on the LoRA input only) runs only when ``lora_rng`` is given, with a
    different mask at every site and every loop step. A weight the model uses
    transposed (``x @ W.T``) by an adapter made without ``fn`` gives a
    ``UserWarning`` once per adapter: pass ``fn`` to ``init`` so that "in" and "out"
    are the model's (the numbers are right either way, the init's fan and a PEFT
    export are not). Wrap the result in
    ``jax.jit``: ``fn`` is traced once per input shape.

    With a stacked adapter (``jlora.stack``), ``adapter_ids[i]`` picks the adapter
    of example ``i`` (``-1``: the base alone), in one batched pass. The examples
    lie along axis 0 of every array argument, or where ``example_axes`` says (as
    ``jax.vmap``'s ``in_axes`` over the positional arguments; None for an argument
    shared by all examples). An id outside ``-1 .. n-1`` makes that example's outputs
    NaN (under ``jit`` it cannot raise; it never gets another adapter's output);
    outside ``jit``, and in ``jlora.Slots.batch``, it is a ``LoraError`` before the
    call. jlora follows the example axis through the model (reshapes,
    transposes, scans, ...) to each adapted weight; where it cannot, or where the
    model mixes examples before a weight, it raises a ``LoraError``. ``mixed`` picks
    how: ``"gather"`` (each example gathers its factors), ``"grouped"`` (rows sorted
    by adapter, two ``ragged_dot``s, S-LoRA style), ``"onehot"`` (every row against
    every adapter's factors, keeping its own by a one-hot weight, sglang-jax's TPU
    form; these two fall back to gather for uses they cannot serve) or ``"auto"``
    (grouped only on GPU/TPU for decode-shaped inputs).

    An adapter with ``dropout > 0`` needs ``lora_rng`` (training) or ``deterministic=True``
    (evaluation): with neither, the call raises a ``LoraError`` rather than silently
    running without dropout, as Flax's and Equinox's dropout do. ``deterministic`` is
    also passed on to ``fn`` when ``fn`` names a ``deterministic`` parameter, or is a
    Flax Linen ``model.apply`` whose ``__call__`` names one, so the model's own dropout
    follows; a model behind a bare ``**kwargs`` does not get it (wrap it to pass it on:
    ``jlora.apply(lambda p, x, deterministic: model(p, x, deterministic=deterministic))``).

    ``lora_mask`` (bool or float, e.g. ``(batch, seq)``; activated LoRA, see
    :func:`jlora.alora_mask`) multiplies the low-rank path of every adapted use per
    token: array arguments whose leading axes have the mask's shape carry its axes,
    and jlora follows them to each use; where a row's token cannot be told, or a use
    cannot be gated (materialized, a lookup, DoRA), it raises a ``LoraError``. An
    adapter with invocation tokens requires it.

    Args:
      fn: the model's function, ``fn(params, *args, **kwargs)``; any pytree of params.
      safe: first check params, adapter and the array arguments for NaN/Inf and raise
        a ``LoraError`` naming the first bad one (under ``jit`` it raises when the call
        runs); it costs one reduction per array.
      mixed: ``"auto"``, ``"gather"``, ``"grouped"`` or ``"onehot"``: the mixed-batch
        path.

    Returns:
      ``f(params, adapter, *args, lora_rng=None, adapter_ids=None, example_axes=None,
      lora_mask=None, deterministic=None, **kwargs)``, returning what ``fn`` returns.
      ``adapter`` may be ``None`` (the base).

    Raises:
      ValueError: an unknown ``mixed``.
      LoraError: (when ``f`` is called) an adapter that does not fit ``params``, dropout
        with neither ``lora_rng`` nor ``deterministic``, a use that contradicts the
        adapter's axes, a mixed batch whose example axis is lost.

    Examples:
      >>> w = {"q_proj": {"kernel": jnp.ones((4, 6))}}
      >>> ad = jlora.init(jax.random.key(0), w, jlora.LoraConfig(rank=2, targets=("q_proj",)))
      >>> f = jlora.apply(lambda p, x: x @ p["q_proj"]["kernel"])
      >>> f(w, ad, jnp.ones((3, 4))).shape
      (3, 6)
    """
    if mixed not in grouped.MODES:
        raise ValueError(f"apply(mixed={mixed!r}): expected one of {grouped.MODES}")

    forwards = _takes_deterministic(fn)

    @functools.wraps(fn)
    def wrapped(
        params: Params,
        adapter: Adapter,
        *args: Any,
        lora_rng: jax.Array | None = None,
        adapter_ids: ArrayLike | None = None,
        example_axes: int | Sequence[int | None] | None = None,
        lora_mask: ArrayLike | None = None,
        deterministic: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        if safe:
            fix = (
                "find where it came from (jax.config.update('jax_debug_nans', True)); "
                "safe=False turns these checks off"
            )
            for what, tree in (
                ("params", params),
                ("adapter", adapter),
                ("args", args),
                ("kwargs", kwargs),
            ):
                check_finite(tree, what, fix)
        if deterministic is not None:
            _check_flag(deterministic)
            if forwards:  # the model's own flag too (Flax's and Equinox's convention)
                kwargs["deterministic"] = deterministic
        elif lora_rng is None:
            _check_no_dropout(adapter)
        ctx = Ctx(key=None if deterministic else lora_rng, mixed=mixed, mask=_as_mask(lora_mask))
        out = interpret_call(fn, params, adapter, (args, kwargs), ctx, adapter_ids, example_axes)
        _warn_transposed(ctx.records)
        return out

    del wrapped.__wrapped__  # its own signature (jax.jit's static_argnames reads it), fn's name
    return wrapped


def _takes_deterministic(fn: Callable) -> bool:
    """Whether ``fn`` names a ``deterministic`` parameter, or is a bound ``apply`` (Flax
    Linen's ``model.apply``) whose object's ``__call__`` names one. ``**kwargs`` alone
    does not count: most models behind a ``**kwargs`` do not take it."""
    owner = getattr(fn, "__self__", None)
    return any(
        _names_deterministic(f)
        for f in (fn, owner.__call__ if callable(owner) else None)
        if f is not None
    )


def _names_deterministic(fn: Callable) -> bool:
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): do not pass it
        return False
    return any(
        p.name == "deterministic" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in ps
    )


def _check_flag(deterministic: object) -> None:
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(
            f"deterministic={deterministic!r} must be a Python bool (under "
            "jax.jit, mark it static: static_argnames='deterministic')"
        )


def _check_no_dropout(adapter: Adapter) -> None:
    """Dropout with no ``lora_rng`` and no ``deterministic``: which one was meant?"""
    if adapter is None:
        return
    for path, node in adapter_nodes(adapter).items():
        rate = getattr(node, "dropout", 0.0)  # whole leaves and token rows have none
        if rate > 0:
            raise LoraError(
                f"adapter at {path!r} has dropout={rate:g} but no lora_rng was given: pass "
                "lora_rng=key to train with dropout, or deterministic=True to run without "
                "it (evaluation, serving)"
            )


def _warn_transposed(records: dict) -> None:
    """A weight used transposed by factors whose axes were never learned (init without fn):
    right for a tied table's ``x @ E.T``, a swapped LoRA for a torch-layout ``(out, in)``
    weight (Equinox, torch ports)."""
    paths = [
        p
        for p, uses in records.items()
        if any(isinstance(u, Use) and u.unlearned_transpose for u in uses)
    ]
    if paths:
        warnings.warn(
            f"{', '.join(map(repr, paths))}: the model contracts the adapter's out axes "
            "(x @ W.T), and the adapter was made without fn, so A and B play swapped roles. "
            "Right for a tied embedding; for an (out, in) weight (Equinox, torch ports) pass "
            "fn to init: jlora.init(key, params, cfg, fn, *example_args)",
            stacklevel=3,
        )


def _as_mask(mask: ArrayLike | None) -> ArrayLike | None:
    return mask if mask is None or not hasattr(mask, "dtype") else jnp.asarray(mask)


def explain(
    fn: Callable,
    params: Params,
    adapter: Adapter,
    *args: Any,
    adapter_ids: ArrayLike | None = None,
    example_axes: int | Sequence[int | None] | None = None,
    mixed: str = "auto",
    lora_mask: ArrayLike | None = None,
    **kwargs: Any,
) -> dict[str, list[str]]:
    """How each adapted leaf is used by ``fn``: ``'factored'`` or ``'materialized (why)'``.

    Traces only (no computation). One entry per use site, in program order;
    a target that ``fn`` never reads maps to an empty list. With a stacked adapter,
    ``adapter_ids``, ``example_axes`` and ``mixed`` are :func:`apply`'s, and each
    factored use also says which path serves the mixed batch (gather or grouped).
    A custom derivative (``jax.custom_vjp``/``custom_jvp``) that receives the weight
    gets it materialized, so that its own rule runs.

    Args:
      fn: the model's function, as for :func:`apply`.
      params: the base (arrays or ``jax.ShapeDtypeStruct``s).
      adapter: the adapter (single or stacked).
      *args: ``fn``'s arguments (only shapes and dtypes matter).
      adapter_ids: as for :func:`apply`, with a stacked adapter.
      example_axes: as for :func:`apply`.
      mixed: as for :func:`apply`.
      lora_mask: as for :func:`apply`; each gated use says "(gated by lora_mask)".
      **kwargs: ``fn``'s keyword arguments.

    Returns:
      ``{path: [how each use is computed, in program order]}``.

    Raises:
      ValueError: an unknown ``mixed``.
      LoraError: what :func:`apply` would raise for these arguments.

    Examples:
      >>> w = {"w": jnp.ones((4, 6))}
      >>> ad = jlora.init(jax.random.key(0), w, jlora.LoraConfig(rank=2, targets=("w",)))
      >>> clip = jax.custom_vjp(lambda w: w)
      >>> clip.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -1, 1),))
      >>> jlora.explain(lambda p, x: x @ p["w"] + x @ clip(p["w"]), w, ad, jnp.ones((3, 4)))
      {'w': ['factored', "materialized (custom_vjp: keeps the user's backward)"]}
    """
    if mixed not in grouped.MODES:
        raise ValueError(f"explain(mixed={mixed!r}): expected one of {grouped.MODES}")
    ctx = Ctx(mixed=mixed)
    known = adapter_ids is None or not isinstance(adapter_ids, jax.ShapeDtypeStruct)
    jax.eval_shape(
        lambda p, ad, i, m: interpret_call(  # known ids stay known: ranked paths
            fn,
            p,
            ad,
            (args, kwargs),
            dataclasses.replace(ctx, mask=_as_mask(m)),
            adapter_ids if known else i,
            example_axes,
        ),
        params,
        adapter,
        adapter_ids,
        lora_mask,
    )
    adapted = [
        path_str(kp)
        for (kp, _), n in zip(flatten(params)[0], match(params, adapter), strict=True)
        if n is not None and not isinstance(n, FullNode)
    ]
    return {p: [str(u) for u in uses] for p, uses in by_path(ctx.records, adapted).items()}
