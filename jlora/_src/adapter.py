"""Adapter nodes: the trainable factors of one leaf and their static settings (data only).

``jlora.init`` makes them (``jlora._src.transforms.init``); every other layer reads them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeAlias, TypeGuard, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora._src.config import LoraError, scaling
from jlora._src.qnode import is_quantized
from jlora._src.targets import Leaf, Params, flatten, path_str

_meta = dict(static=True)

#: Where a node's stacked/in/out axes came from, and what that lets ``apply`` do.
#: ``"fn"``: learned by tracing the model (``init(..., fn)``, ``peft.load(..., fn)``);
#: ``"flax"``: Flax's convention, for factors jlora made (``init`` without ``fn``): they
#: are trained for those axes, so any use is consistent; ``"file"``: fixed by the file
#: (a PEFT embedding's or convolution's factors); ``"given"``: passed as ``axes=``;
#: ``"assumed"``: Flax's convention assumed for factors a file made for torch's layout
#: (``peft.load`` without ``fn``). A use that swaps such factors' roles (``x @ W.T``)
#: would apply the file's update transposed, so ``apply`` refuses it; ``"lookup"``: a PEFT
#: embedding adapter saved with ``ensure_weight_tying=False``, which PEFT applies where the
#: table is looked up only: ``apply`` refuses a use as a tied head (``x @ E.T``).
AXES_FROM = ("fn", "flax", "file", "given", "assumed", "lookup")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraNode:
    """The trainable factors of one adapted leaf, plus its static settings.

    ``a`` is ``(*stack, in, r)`` and ``b`` is ``(*stack, r, out)``, where
    ``in``/``out`` flatten the kernel's ``in_axes``/``out_axes`` (in axis
    order) and ``stack`` are the kernel's ``stack_axes``. ``axes_from`` records where those
    axes came from (see :data:`AXES_FROM`). The adapted weight is
    ``W0 + scale * A @ B`` mapped back onto the kernel's own axes; with DoRA
    (``magnitude`` set) it is ``(magnitude / ||W0 + scale * A @ B||) * (W0 + scale * A @ B)``,
    the norm taken over the input axes per output feature.

    Examples:
      >>> cfg = jlora.LoraConfig(rank=2, targets="w")
      >>> ad = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 6))}, cfg)
      >>> node = ad["w"]
      >>> node.a.shape, node.b.shape, node.scale, node.in_axes, node.out_axes
      ((4, 2), (2, 6), 8.0, (0,), (1,))
    """

    kind: ClassVar[str] = "lora"

    a: Any
    b: Any
    rank: int = dataclasses.field(metadata=_meta)
    alpha: float = dataclasses.field(metadata=_meta)
    dropout: float = dataclasses.field(metadata=_meta)
    shape: tuple[int, ...] = dataclasses.field(metadata=_meta)
    stack_axes: tuple[int, ...] = dataclasses.field(metadata=_meta)
    in_axes: tuple[int, ...] = dataclasses.field(metadata=_meta)
    out_axes: tuple[int, ...] = dataclasses.field(metadata=_meta)
    magnitude: Any = None  # DoRA: (*stack, out), the norm of each output feature
    axes_from: str = dataclasses.field(default="flax", metadata=_meta)
    #: Activated LoRA: the invocation tokens (PEFT's ``alora_invocation_tokens``); the
    #: update then acts only where ``apply``'s ``lora_mask`` says (``jlora.alora_mask``).
    invocation: tuple[int, ...] | None = dataclasses.field(default=None, metadata=_meta)
    #: rsLoRA (PEFT's ``use_rslora``): the scale is ``alpha / sqrt(rank)``, not ``alpha / rank``.
    rslora: bool = dataclasses.field(default=False, metadata=_meta)

    @property
    def scale(self) -> float:
        """The factor ``s`` in ``W0 + s * A @ B``, from ``alpha``, ``rank`` and ``rslora``."""
        return scaling(self.alpha, self.rank, self.rslora)

    @classmethod
    def of(
        cls,
        a: jax.Array,
        b: jax.Array,
        *,
        alpha: float,
        shape: Sequence[int],
        axes: tuple[Sequence[int], Sequence[int], Sequence[int]],
        **settings: Any,
    ) -> LoraNode:
        """The node of factors ``a`` ``(*stack, in, r)`` and ``b`` ``(*stack, r, out)`` on a
        kernel of ``shape`` whose ``axes`` are ``(stack_axes, in_axes, out_axes)``: the rank
        read off ``a``, every setting made the plain type a node keeps. ``settings``: any
        other field (``rslora``, ``dropout``, ``magnitude``, ``axes_from``, ``invocation``).
        What every place that makes a node from factors calls.

        Examples:
          >>> node = jlora.LoraNode.of(jnp.zeros((4, 2)), jnp.zeros((2, 6)), alpha=4.0,
          ...                          shape=(4, 6), axes=((), (0,), (1,)), rslora=True)
          >>> node.rank, round(node.scale, 4), node.dropout
          (2, 2.8284, 0.0)
        """
        stack_axes, in_axes, out_axes = (tuple(int(ax) for ax in g) for g in axes)
        settings["dropout"] = float(settings.get("dropout", 0.0))
        return cls(
            a=a,
            b=b,
            rank=int(np.shape(a)[-1]),
            alpha=float(alpha),
            shape=tuple(int(n) for n in shape),
            stack_axes=stack_axes,
            in_axes=in_axes,
            out_axes=out_axes,
            **settings,
        )

    @property
    def lora(self) -> LoraNode:
        return self

    def check(self, path: str, leaf: Leaf) -> None:
        """Raise a LoraError unless the node fits ``leaf`` (every kind has this method):
        its shape, its factors' shapes and a dtype that keeps the weight's precision."""
        _check_factors(self, path, leaf, ())

    def placed(self, sharding: NamedSharding) -> LoraNode:
        """The node with a ``NamedSharding`` in place of each array, laid out after the
        base leaf's ``sharding`` (every kind has this method): ``a`` follows the kernel's
        in axes, ``b`` and the magnitude its out axes, the rank axis is replicated."""
        return _placed_factors(self, sharding, ())

    def labels(self) -> tuple[tuple[str, int], ...]:
        """Per kernel axis: ``('s'|'i'|'o', index within that group)``."""
        return _labels(self)

    def unflat(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """``a`` ``(*stack, *in, r)``, ``b`` ``(*stack, r, *out)``, magnitude ``(*stack, *out)``."""
        return _unflat(self, ())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedNode:
    """``n`` adapters of one leaf, for batches that mix adapters (``jlora.stack``).

    ``a`` is ``(n, *stack, in, R)`` and ``b`` ``(n, *stack, R, out)``, zero-padded to
    the largest rank ``R`` (which leaves every ``A @ B`` unchanged); with DoRA
    ``magnitude`` is ``(n, *stack, out)``. ``members`` holds each adapter's own static
    settings (every :class:`LoraNode` setting not in :data:`SHARED`: rank, alpha, rslora,
    invocation tokens), so the arrays are exactly what trains and :meth:`member` gives
    back each adapter whole.
    """

    kind: ClassVar[str] = "stacked"
    #: The settings every stacked adapter shares (``jlora.stack`` checks they agree).
    SHARED: ClassVar[tuple[str, ...]] = ("dropout", "shape", "stack_axes", "in_axes", "out_axes")

    a: Any
    b: Any
    members: tuple[tuple[tuple[str, Any], ...], ...] = dataclasses.field(metadata=_meta)
    dropout: float = dataclasses.field(metadata=_meta)
    shape: tuple[int, ...] = dataclasses.field(metadata=_meta)
    stack_axes: tuple[int, ...] = dataclasses.field(metadata=_meta)
    in_axes: tuple[int, ...] = dataclasses.field(metadata=_meta)
    out_axes: tuple[int, ...] = dataclasses.field(metadata=_meta)
    magnitude: Any = None
    axes_from: str = dataclasses.field(default="flax", metadata=_meta)

    @classmethod
    def of(
        cls,
        nodes: list[LoraNode],
        a: jax.Array,
        b: jax.Array,
        magnitude: jax.Array | None,
        axes_from: str,
    ) -> StackedNode:
        """The stack of ``nodes`` (which agree on :data:`SHARED`) with the padded arrays."""
        own = [k for k in static_fields(nodes[0]) if k not in cls.SHARED and k != "axes_from"]
        members = tuple(tuple((k, getattr(n, k)) for k in own) for n in nodes)
        shared = {k: getattr(nodes[0], k) for k in cls.SHARED}
        return cls(a=a, b=b, members=members, magnitude=magnitude, axes_from=axes_from, **shared)

    def member(self, i: int) -> LoraNode:
        """Adapter ``i`` as a single node, at its own rank."""
        own = dict(self.members[i])
        r = own["rank"]
        mag = None if self.magnitude is None else self.magnitude[i]
        shared = {k: getattr(self, k) for k in self.SHARED}
        return LoraNode(
            a=self.a[i][..., :r],
            b=self.b[i][..., :r, :],
            magnitude=mag,
            axes_from=self.axes_from,
            **shared,
            **own,
        )

    def _each(self, name: str) -> tuple:
        return tuple(dict(m)[name] for m in self.members)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._each("rank")

    @property
    def alphas(self) -> tuple[float, ...]:
        return self._each("alpha")

    @property
    def scale(self) -> tuple[float, ...]:
        """Each adapter's ``LoraNode.scale``."""
        return tuple(
            scaling(a, r, rs)
            for a, r, rs in zip(self.alphas, self.ranks, self._each("rslora"), strict=True)
        )

    @property
    def invocations(self) -> tuple:
        """Each adapter's ``LoraNode.invocation`` (None for a plain one); () when none is."""
        found = self._each("invocation")
        return found if any(found) else ()

    @property
    def rank(self) -> int:
        return max(self.ranks)

    @property
    def lora(self) -> StackedNode:
        return self

    def check(self, path: str, leaf: Leaf) -> None:
        _check_factors(self, path, leaf, (len(self.members),))

    def placed(self, sharding: NamedSharding) -> StackedNode:
        return _placed_factors(self, sharding, (None,))  # the adapter axis: replicated

    def labels(self) -> tuple[tuple[str, int], ...]:
        return _labels(self)

    def unflat(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """As :meth:`LoraNode.unflat`, with the leading adapter axis ``n``."""
        return _unflat(self, (len(self.ranks),))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullNode:
    """A leaf trained in full beside the adapter (PEFT's ``modules_to_save``): ``weight``
    (the leaf's shape) is used, merged and saved in place of the base leaf."""

    kind: ClassVar[str] = "full"
    lora: ClassVar[None] = None

    weight: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.weight))

    def check(self, path: str, leaf: Leaf) -> None:
        _check_whole(path, "weight", self.weight, tuple(np.shape(leaf)), leaf)

    def placed(self, sharding: NamedSharding) -> FullNode:
        return FullNode(weight=sharding)  # the trained copy lies where the base leaf does


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenNode:
    """Trained rows of a table (PEFT's ``trainable_token_indices``): ``rows`` ``(k, *rest)``
    replace rows ``indices`` of the ``shape`` ``(vocab, *rest)`` leaf, wherever it is read."""

    kind: ClassVar[str] = "tokens"
    lora: ClassVar[None] = None

    rows: Any
    indices: tuple[int, ...] = dataclasses.field(metadata=_meta)
    shape: tuple[int, ...] = dataclasses.field(metadata=_meta)

    def check(self, path: str, leaf: Leaf) -> None:
        shape = tuple(np.shape(leaf))
        if not is_quantized(leaf) and (tuple(self.shape) != shape or max(self.indices) >= shape[0]):
            raise LoraError(
                f"token rows for {path!r} were made for a table of shape "
                f"{tuple(self.shape)} but params has {shape}; re-create them"
            )
        _check_whole(path, "rows", self.rows, (len(self.indices), *shape[1:]), leaf)

    def placed(self, sharding: NamedSharding) -> TokenNode:
        """A few rows: whole along the token axis, the rest as the table."""
        spec = tuple(sharding.spec) + (None,) * (len(self.shape) - len(sharding.spec))
        rows = NamedSharding(sharding.mesh, PartitionSpec(None, *spec[1:]))
        return dataclasses.replace(self, rows=rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayersNode:
    """LoRA on some layers of a scanned stack (PEFT's ``layers_to_transform``): ``node``
    adapts the sub-stack of ``layers`` (indices along the kernel's first stacked axis,
    whose size there is ``len(layers)``); the other layers have no factors, and in a
    ``scan`` cost nothing (each step runs a ``cond``)."""

    kind: ClassVar[str] = "layers"

    node: LoraNode
    layers: tuple[int, ...] = dataclasses.field(metadata=_meta)
    length: int = dataclasses.field(metadata=_meta)  # the stack's full size

    @property
    def lora(self) -> LoraNode:
        return self.node

    def check(self, path: str, leaf: Leaf) -> None:
        _check_layers(self, path, leaf)

    def placed(self, sharding: NamedSharding) -> LayersNode:
        """Its few layers are whole along the stack axis."""
        whole = list(sharding.spec) + [None] * (len(self.shape) - len(sharding.spec))
        whole[self.node.stack_axes[0]] = None
        layers = NamedSharding(sharding.mesh, PartitionSpec(*whole))
        return dataclasses.replace(self, node=self.node.placed(layers))

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole kernel's shape."""
        ax = self.node.stack_axes[0]
        return (*self.node.shape[:ax], self.length, *self.node.shape[ax + 1 :])

    def __getattr__(self, name: str) -> Any:  # the node's rank, alpha, scale, axes, a, b, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.node, name)


def _labels(node: LoraNode | StackedNode) -> tuple[tuple[str, int], ...]:
    kinds = {
        **{ax: "s" for ax in node.stack_axes},
        **{ax: "i" for ax in node.in_axes},
        **{ax: "o" for ax in node.out_axes},
    }
    groups = {"s": node.stack_axes, "i": node.in_axes, "o": node.out_axes}
    return tuple((kinds[ax], groups[kinds[ax]].index(ax)) for ax in range(len(node.shape)))


def _unflat(
    node: LoraNode | StackedNode, lead: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    def dims(axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(node.shape[ax] for ax in axes)

    stack = lead + dims(node.stack_axes)
    mag = None if node.magnitude is None else node.magnitude.reshape(stack + dims(node.out_axes))
    return (
        node.a.reshape(stack + dims(node.in_axes) + (node.rank,)),
        node.b.reshape((*stack, node.rank, *dims(node.out_axes))),
        mag,
    )


#: Every node kind by its ``kind`` (what a checkpoint records).
KINDS: dict[str, type] = {
    c.kind: c for c in (LoraNode, StackedNode, FullNode, TokenNode, LayersNode)
}
#: A low-rank node kind (what ``_placed_factors`` keeps the type of).
N = TypeVar("N", "LoraNode", "StackedNode")
#: Any node kind.
Node = LoraNode | StackedNode | FullNode | TokenNode | LayersNode
#: An adapter: a pytree of the same structure as its base, with a node at each adapted leaf
#: and ``None`` elsewhere. JAX takes any registered pytree node (an Equinox module, a
#: dataclass), so the alias ends in ``object``: code that holds one goes through the tree
#: utilities, never indexes it.
Adapter: TypeAlias = Node | Mapping[Any, "Adapter"] | Sequence["Adapter"] | object | None


def is_node(x: object) -> TypeGuard[Node]:
    return isinstance(x, tuple(KINDS.values()))


def is_lora(x: object) -> TypeGuard[LoraNode | StackedNode]:
    """A node with low-rank factors (plain or stacked), not a full leaf or token rows."""
    return isinstance(x, (LoraNode, StackedNode))


def is_whole(node: Node | None) -> bool:
    """A node that replaces the leaf's values (a full leaf, token rows), not a delta."""
    return is_node(node) and node.lora is None


def static_fields(node: Node) -> tuple[str, ...]:
    """The names of a node's static settings (its pytree metadata), in field order."""
    return tuple(f.name for f in dataclasses.fields(node) if f.metadata.get("static"))


def arrays(node: Node) -> dict[str, Any]:
    """A node's arrays by field name (a nested node's in place of it; None left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if is_node(value):
            out.update(arrays(value))
        elif not f.metadata.get("static") and value is not None:
            out[f.name] = value
    return out


def settings(node: Node) -> dict[str, Any]:
    """A node's static settings as JSON (tuples as lists), with its ``kind``; a nested
    node's under its field's name. :func:`from_settings` inverts it."""
    out: dict[str, Any] = {"kind": node.kind}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if is_node(value):
            out[f.name] = settings(value)
        elif f.metadata.get("static"):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_settings(saved: dict[str, Any], values: dict[str, Any]) -> Node:
    """The node :func:`settings` described, with its :func:`arrays` ``values``. A setting
    the file lacks takes its default (files written before that setting existed)."""
    cls = KINDS[saved["kind"]]
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if isinstance(saved.get(f.name), dict):  # a nested node
            kwargs[f.name] = from_settings(saved[f.name], values)
        elif f.metadata.get("static") and f.name in saved:
            value = saved[f.name]
            kwargs[f.name] = _tuples(value) if isinstance(value, list) else value
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _tuples(value: list) -> tuple:
    return tuple(_tuples(v) if isinstance(v, list) else v for v in value)


def adapter_nodes(adapter: Adapter) -> dict[str, Any]:
    """``{path: node}`` for every node of an adapter tree, of any container types.

    The paths are :func:`jlora.path_str`'s, the ones :func:`jlora.explain` and the errors
    print; the nodes are the tree's own (``LoraNode``, a stack's ``StackedNode``, ...).

    Args:
      adapter: an adapter tree, as :func:`jlora.init`, :func:`jlora.stack` or a loader
        gives it.

    Returns:
      A dict from each node's path to the node, in the tree's order.

    Raises:
      LoraError: a leaf of ``adapter`` is not a jlora node (an array, say), naming its path.

    Examples:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> cfg = jlora.LoraConfig(rank=2, targets=("dense",))
      >>> adapter = jlora.init(jax.random.key(0), params, cfg)
      >>> {path: node.rank for path, node in jlora.adapter_nodes(adapter).items()}
      {'dense/kernel': 2}
    """
    found = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_node)[0]:
        if not is_node(leaf):
            raise LoraError(
                f"adapter entry at {path_str(kp)!r} is {type(leaf).__name__}; "
                "expected a jlora node (build adapters with jlora.init)"
            )
        found[path_str(kp)] = leaf
    return found


def rebuild(like: Adapter, nodes: Mapping[str, Node | None]) -> Adapter:
    """``like``'s tree with each node replaced by ``nodes[path]``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_node)
    return jax.tree_util.tree_unflatten(treedef, [nodes[path_str(kp)] for kp, _ in leaves])


def same_leaves(adapters: Sequence[Adapter]) -> list[dict]:
    """Each adapter's ``{path: node}``, checked to adapt the same leaves (to stack or combine)."""
    found = [adapter_nodes(ad) for ad in adapters]
    for i, nodes in enumerate(found[1:], 1):
        if set(nodes) != set(found[0]):
            diff = sorted(set(nodes) ^ set(found[0]))[:3]
            raise LoraError(
                f"adapters 0 and {i} adapt different leaves ({diff}); stacked or "
                "combined adapters must target the same leaves"
            )
    return found


def match(params: Params, adapter: Adapter) -> list:
    """The adapter's node (or None) for each leaf of params, matched by key path."""
    nodes = adapter_nodes(adapter)
    out = []
    for kp, leaf in flatten(params)[0]:
        node = nodes.pop(path_str(kp), None)
        if node is not None:
            node.check(path_str(kp), leaf)
        out.append(node)
    if nodes:
        some = [path_str(kp) for kp, _ in flatten(params)[0][:3]]
        raise LoraError(
            f"adapter has entries for {sorted(nodes)[:3]} that are not in params "
            f"(an adapter for another model?); params paths look like {some}"
        )
    return out


def _check_layers(node: LayersNode, path: str, leaf: Leaf) -> None:
    """The node covers distinct layers of ``leaf``'s stack, and fits those layers."""
    if not node.node.stack_axes or tuple(node.shape) != tuple(np.shape(leaf)):
        raise LoraError(
            f"adapter for {path!r} adapts layers {list(node.layers)} of a stack "
            f"of shape {tuple(node.shape)}, but params has "
            f"{tuple(np.shape(leaf))}; re-create it with jlora.init"
        )
    if sorted(set(node.layers)) != list(node.layers) or not all(
        0 <= i < node.length for i in node.layers
    ):
        raise LoraError(
            f"adapter for {path!r}: layers {list(node.layers)} must be distinct, "
            f"sorted and below the stack's {node.length}"
        )
    dtype = leaf.compute_dtype if is_quantized(leaf) else jnp.result_type(leaf)
    node.node.check(path, jax.ShapeDtypeStruct(node.node.shape, dtype))


def _placed_factors(node: N, sharding: NamedSharding, lead: tuple[None, ...]) -> N:
    """A low-rank node's arrays as shardings (``lead``: a stack's adapter axis)."""
    spec = tuple(sharding.spec) + (None,) * (len(node.shape) - len(sharding.spec))
    stack = lead + tuple(spec[ax] for ax in node.stack_axes)
    ins, outs = _axis_spec(spec, node.in_axes), _axis_spec(spec, node.out_axes)

    def named(*s: Any) -> NamedSharding:
        return NamedSharding(sharding.mesh, PartitionSpec(*s))

    fields: dict[str, Any] = dict(
        a=named(*stack, ins, None),
        b=named(*stack, None, outs),
        magnitude=None if node.magnitude is None else named(*stack, outs),
    )
    return dataclasses.replace(node, **fields)


def _axis_spec(spec: tuple, axes: tuple[int, ...]) -> Any:
    """The sharding of ``axes`` flattened into one: the major axis's, if the rest are whole."""
    parts = [spec[ax] for ax in axes]
    return parts[0] if all(p is None for p in parts[1:]) else None


def _check_factors(
    node: LoraNode | StackedNode, path: str, leaf: Leaf, lead: tuple[int, ...]
) -> None:
    """A low-rank node (``lead``: a stack's adapter axis) fits ``leaf``: its shape, its
    factors' shapes and a dtype that keeps precision."""
    if tuple(node.shape) != tuple(np.shape(leaf)):
        raise LoraError(
            f"adapter for {path!r} was made for shape {tuple(node.shape)} but "
            f"params has {tuple(np.shape(leaf))}; re-create it with jlora.init "
            "for these params"
        )

    def dims(axes: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(node.shape[ax] for ax in axes),)

    stack = lead + tuple(node.shape[ax] for ax in node.stack_axes)
    want = {
        "a": stack + dims(node.in_axes) + (node.rank,),
        "b": (*stack, node.rank, *dims(node.out_axes)),
        "magnitude": None if node.magnitude is None else stack + dims(node.out_axes),
    }
    base_dtype = jnp.dtype(leaf.compute_dtype if is_quantized(leaf) else jnp.result_type(leaf))
    for name, shape in want.items():
        value = getattr(node, name)
        if shape is None:
            continue
        if tuple(np.shape(value)) != shape:
            raise LoraError(
                f"adapter for {path!r} has {name} of shape {tuple(np.shape(value))}"
                f", but rank {node.rank} and kernel {tuple(node.shape)} need {shape}"
                "; re-create it with jlora.init (or load it with the settings it "
                "was saved with)"
            )
        dtype = jnp.dtype(jnp.result_type(value))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise LoraError(
                f"adapter for {path!r} has {name} of dtype {dtype}, not floating "
                "point; LoRA factors must be floats (jlora.init makes them so)"
            )
        if (
            jnp.issubdtype(base_dtype, jnp.floating)
            and jnp.finfo(dtype).nmant < jnp.finfo(base_dtype).nmant
        ):
            raise LoraError(
                f"adapter for {path!r} has {name} in {dtype} but the weight is {base_dtype}: "
                f"the low-rank update would be silently rounded to {dtype}; keep factors at "
                f"least as precise as the weight: jax.tree.map(lambda v: v.astype(jnp."
                f"{base_dtype}), adapter)"
            )


def _check_whole(path: str, name: str, value: jax.Array, want: tuple, leaf: Leaf) -> None:
    """A node that replaces a leaf's values (``value``, its field ``name``, must have shape
    ``want``) lies on a float leaf, in at least its dtype."""
    if is_quantized(leaf):
        raise LoraError(
            f"{path!r} is {leaf.qtype.upper()}-quantized; a leaf trained in "
            "full or by token rows must stay float: leave it out of "
            "jlora.quantize's targets"
        )
    have = tuple(np.shape(value))
    if have != want:
        raise LoraError(
            f"adapter for {path!r} has {name} of shape {have}, params need {want}; "
            "re-create it with jlora.init for these params"
        )
    dtype = jnp.dtype(jnp.result_type(value))
    if not jnp.issubdtype(dtype, jnp.floating) or (
        jnp.finfo(dtype).nmant < jnp.finfo(jnp.result_type(leaf)).nmant
    ):
        raise LoraError(
            f"adapter for {path!r} has {name} in {dtype} but the weight is "
            f"{jnp.result_type(leaf)}; keep it in the weight's dtype"
        )


def default_axes(ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Flax's convention: last axis out, second-to-last in, leading axes stacked."""
    return tuple(range(ndim - 2)), (ndim - 2,), (ndim - 1,)
