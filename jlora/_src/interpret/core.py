"""The interpreter's core: the evaluation loop and the rule table it dispatches on.

A jaxpr is evaluated equation by equation. An equation whose inputs are all
ordinary values is bound as it is; one that touches a symbolic value (an
adapted weight, :class:`~jlora._src.interpret.sym.Sym`, or a quantized one,
:class:`~jlora._src.numerics.qview.QView`) goes to the rule registered for its
primitive in :data:`RULES`, keyed by the primitive object as JAX's own
interpreters are (``ad.primitive_jvps[p] = rule``). A primitive with no rule
materializes the weight for that one use (:func:`materialize_rule`), and the
use is recorded so ``jlora.explain`` can report it.

A rule is ``rule(eqn, invals, ctx) -> outputs`` (a list when the primitive has
multiple results). Rules live one module per family: ``dot.py``,
``shape.py``, ``control.py``; importing :mod:`jlora._src.interpret` registers them.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore
from jax.extend.core import Jaxpr, JaxprEqn, Primitive
from jax.extend.core import primitives as jprims

from jlora._src.interpret import sym as sy
from jlora._src.interpret.walk import Expanded
from jlora._src.numerics import qview as qv

Rule = Callable[[Any, list, "Ctx"], Any]
#: The rule of each primitive for an adapted (factored) weight, keyed by the primitive.
RULES: dict[jcore.Primitive, Rule] = {}
#: Rules by primitive name, only for primitives this JAX does not export as objects.
RULES_BY_NAME: dict[str, Rule] = {}
#: The rules for a :class:`~jlora._src.interpret.sym.Probe` (``init`` learning a weight's axes),
#: by primitive and by name as above; a primitive with none takes its rule in ``RULES``.
PROBE_RULES: dict[jcore.Primitive, Rule] = {}
PROBE_RULES_BY_NAME: dict[str, Rule] = {}
_EXPORTED = {p.name for p in vars(jprims).values() if isinstance(p, jcore.Primitive)}


def register(
    *prims: jcore.Primitive, names: tuple[str, ...] = (), on: type = sy.Sym
) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles ``prims`` when an input is a value of type ``on``
    (:class:`~jlora._src.interpret.sym.Sym`, or :class:`~jlora._src.interpret.sym.Probe` for its
    own rule set); ``names`` are fallbacks for primitives this JAX does not export (older
    names of renamed primitives)."""
    probe = on is sy.Probe
    table, by_name = (PROBE_RULES, PROBE_RULES_BY_NAME) if probe else (RULES, RULES_BY_NAME)

    def add(rule: Rule) -> Rule:
        for p in prims:
            table[p] = rule
        for n in names:
            if n not in _EXPORTED:
                by_name[n] = rule
        return rule

    return add


@dataclasses.dataclass
class Ctx:
    """What rules share: the dropout key (folded per site and step), the use records,
    the hi primitives' sub-jaxprs as the analyses saw them and, for a mixed-adapter
    batch, where each dot's operands carry the example axis (``example_axis.analyze``'s
    sites)."""

    key: Any = None
    records: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    expanded: Expanded = dataclasses.field(default_factory=Expanded)
    examples: Any = None  # a walk.Sites
    mixed: str = "auto"  # a mixed batch's path: "auto", "gather" or "grouped"
    capture: Any = None  # capture mode (EVA): a capture.Capture collecting input statistics
    #: ``lora_mask``: the per-token gate, and where each dot's operands carry its axes
    #: (``token_axes.analyze``'s sites).
    mask: Any = None
    tokens: Any = None  # a walk.Sites

    def record(self, path: str, what: Any) -> None:
        self.records[path].append(what)

    def fold(self, i: int | jax.Array) -> Ctx:
        key = None if self.key is None else jax.random.fold_in(self.key, i)
        return dataclasses.replace(self, key=key)


def has_sym(vals: Iterable) -> bool:
    """Whether any value is symbolic: an adapted weight or a quantized one."""
    return any(isinstance(v, (sy.Sym, qv.QView)) for v in vals)


def bind_params(eqn: JaxprEqn) -> tuple[list, dict]:
    """``(subfuns, params)`` to bind ``eqn``'s primitive with: JAX before 0.9.2 returned
    both from ``get_bind_params``, later versions the params alone."""
    got = eqn.primitive.get_bind_params(eqn.params)
    return (list(got[0]), got[1]) if isinstance(got, tuple) else ([], got)


def bind(eqn: JaxprEqn, vals: Sequence) -> Any:
    """The equation's primitive applied to ``vals`` as JAX would."""
    subfuns, params = bind_params(eqn)
    return eqn.primitive.bind(*subfuns, *vals, **params)


def materialized(vals: Iterable, ctx: Ctx, why: str) -> list:
    """``vals`` with every symbolic value made a plain array (recorded as ``why``)."""
    return [sy.materialize(v, ctx.record, why) for v in vals]


def materialize_rule(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """The default: build the weight for this use only (correct, slower) and say so."""
    return bind(eqn, materialized(invals, ctx, eqn.primitive.name))


def rule_for(prim: Primitive, vals: Sequence = ()) -> Rule:
    """The rule for ``prim`` on ``vals``: a probe's own when an input is a
    :class:`~jlora._src.interpret.sym.Probe` and ``prim`` has one, else the factored rule."""
    if any(isinstance(v, sy.Probe) for v in vals):
        rule = PROBE_RULES.get(prim) or PROBE_RULES_BY_NAME.get(prim.name)
        if rule is not None:
            return rule
    return RULES.get(prim) or RULES_BY_NAME.get(prim.name, materialize_rule)


def evaluate(jaxpr: Jaxpr, consts: Sequence, args: Sequence, ctx: Ctx) -> list:
    """The outputs of ``jaxpr`` on ``args``, symbolic values carried through its rules."""
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if has_sym(invals):
                outs = rule_for(eqn.primitive, invals)(eqn, invals, ctx.fold(i))
            else:
                outs = bind(eqn, invals)
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]
