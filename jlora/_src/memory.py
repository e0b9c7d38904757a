"""Training memory estimate for a Llama-style model: weights, gradients, Adam, activations.

A mixture of experts (Mixtral, gpt-oss: ``experts`` MLPs a layer, each token through
``experts_per_tok`` of them) counts each expert's MLP weights and adapter, and each
token's MLP activations once per expert it visits.

Each method fixes the bytes per parameter of what it keeps:

============  =========================  ==================  ============================
method        base weights               gradients           Adam moments
============  =========================  ==================  ============================
full-fp32     4                          4 (all)             8 (all)
full-fp16     2                          2 (all)             4 (all, 16-bit states)
lora          2 (bf16/fp16, frozen)      4 (adapter only)    8 (adapter only)
qlora         4.127/8 on linear layers,  4 (adapter only)    8 (adapter only)
              2 elsewhere
============  =========================  ==================  ============================

Adapters are fp32 (4 bytes, plus their 4-byte gradient and 8 bytes of Adam).
Activations kept for the backward pass, per token and layer, in elements:
``10*hidden + 4*intermediate + heads*seq`` (norm inputs and outputs, q/k/v
before and after RoPE, attention probabilities and output, the four MLP
intermediates), times 4 bytes for full-fp32 and 2 otherwise; the fp32 logits
and their gradient add ``8*vocab`` bytes per token. With activation
checkpointing only each layer's input is kept, plus one layer's activations
while it is recomputed. Not counted: framework workspace, allocator
fragmentation, the CUDA context. ``benchmarks/memory.py`` checks the estimate
against XLA's ``memory_analysis()``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from jlora._src.config import LoraError
from jlora._src.numerics import formats, microscaled, quant, scaled

GB = 1e9
#: The modules that register the formats these tables read (imported for that).
_REGISTERING = (quant, scaled, microscaled)
#: Bits per linear-layer parameter of each ``jlora.quantize`` format, less a scale per
#: whole input axis (int8/fp8: ``32 / in`` bits more, which :func:`qbits` adds):
#: derived from the format registry.
QBITS = {qtype: fmt.bits(math.inf) for qtype, fmt in formats.FORMATS.items()}
#: The formats a ``qlora`` row may take (``estimate``'s ``qtype``), smallest first.
QTYPES = tuple(sorted(QBITS, key=lambda q: (QBITS[q], q)))


def qbits(qtype: str, rows: int) -> float:
    """Bits per linear-layer parameter of ``jlora.quantize``'s format ``qtype`` for a
    weight with ``rows`` inputs, its scales included: the format registry's own count.

    Examples:
      >>> from jlora._src.memory import qbits
      >>> round(qbits("nf4", 4096), 3), qbits("int4", 4096), qbits("int8", 4096)
      (4.127, 4.25, 8.0078125)
    """
    if qtype not in formats.FORMATS:
        raise LoraError(f"qtype={qtype!r} is not one of {sorted(formats.FORMATS)}")
    return formats.FORMATS[qtype].bits(rows)


METHODS = ("full-fp32", "full-fp16", "lora", "qlora")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-style decoder that the estimate needs.

    Examples:
      >>> from jlora.memory import Shape
      >>> tiny = Shape(hidden=64, intermediate=172, layers=2, heads=4, vocab=256)
      >>> tiny.linear_shapes()["q_proj"]
      (64, 64)

      A mixture of experts: 8 expert MLPs a layer, each token through 2 of them (or
      ``Shape.from_config`` of a Mixtral or gpt-oss ``config.json``).

      >>> moe = Shape(hidden=64, intermediate=128, layers=2, heads=4, vocab=256,
      ...             experts=8, experts_per_tok=2)
      >>> moe.copies("up_proj"), moe.linear_params == 2 * (4 * 64 * 64 + 8 * 3 * 64 * 128)
      (8, True)
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None
    tied: bool = False
    #: Width of one attention head (``hidden / heads`` when None).
    head_dim: int | None = None
    #: Expert MLPs per layer (0: one dense MLP); ``intermediate`` is then one expert's.
    experts: int = 0
    #: Experts each token visits.
    experts_per_tok: int = 0

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each linear layer in one decoder layer (of one expert's, for
        the MLP of a mixture of experts)."""
        h, i = self.hidden, self.intermediate
        hd = self.head_dim or h // self.heads
        q, kv = self.heads * hd, (self.kv_heads or self.heads) * hd
        return dict(
            q_proj=(h, q),
            k_proj=(h, kv),
            v_proj=(h, kv),
            o_proj=(q, h),
            gate_proj=(h, i),
            up_proj=(h, i),
            down_proj=(i, h),
        )

    def copies(self, name: str) -> int:
        """How many of linear layer ``name`` one decoder layer has (its experts)."""
        return max(1, self.experts) if name in LINEAR[4:] else 1

    @property
    def linear_params(self) -> int:
        shapes = self.linear_shapes().items()
        return self.layers * sum(self.copies(n) * a * b for n, (a, b) in shapes)

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        router = self.layers * self.hidden * self.experts
        return self.linear_params + embed + router + (2 * self.layers + 1) * self.hidden

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        shapes = self.linear_shapes().items()
        return self.layers * sum(
            self.copies(n) * rank * (a + b) for n, (a, b) in shapes if n in targets
        )

    @property
    def mlp_visits(self) -> int:
        """MLPs each token goes through in a layer."""
        return self.experts_per_tok if self.experts else 1

    @staticmethod
    def from_config(cfg: dict) -> Shape:
        """From a Hugging Face ``config.json`` dict (or the example LlamaConfig's field names)."""

        def pick(*keys: str) -> Any:
            return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

        fields: dict[str, Any] = dict(
            hidden=pick("hidden_size"),
            intermediate=pick("intermediate_size"),
            layers=pick("num_hidden_layers", "num_layers"),
            heads=pick("num_attention_heads", "num_heads"),
            vocab=pick("vocab_size"),
        )
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise LoraError(
                f"config lacks {missing}; it needs hidden_size, intermediate_size, "
                "num_hidden_layers, num_attention_heads and vocab_size"
            )
        experts = pick("num_local_experts", "num_experts", "n_routed_experts") or 0
        per_tok = pick("num_experts_per_tok")
        if experts and per_tok is None:
            raise LoraError(
                f"config has {experts} experts but no num_experts_per_tok; add how many "
                "experts each token visits (num_experts_per_tok)"
            )
        if experts and pick("moe_intermediate_size") is not None:  # Qwen-MoE, DeepSeek
            fields["intermediate"] = pick("moe_intermediate_size")  # (one expert's width)
        return Shape(
            **fields,
            kv_heads=pick("num_key_value_heads", "num_kv_heads"),
            tied=bool(pick("tie_word_embeddings", "tie_embeddings")),
            head_dim=pick("head_dim"),
            experts=experts,
            experts_per_tok=per_tok if experts else 0,
        )

    @staticmethod
    def from_params(n: float) -> Shape:
        """Llama proportions for ``n`` parameters: ``n ~= 12 L h^2`` with ``L = h / 128``."""
        if n <= 0:
            raise LoraError(f"params={n} must be positive, e.g. 7e9")
        h = 512 * max(1, round((n * 128 / 12) ** (1 / 3) / 512))
        return Shape(
            hidden=h,
            intermediate=round(h * 8 / 3 / 256) * 256,
            layers=h // 128,
            heads=h // 128,
            vocab=32000,
        )


#: Llama-2 7B, the article's example.
LLAMA_7B = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)


def estimate(  # noqa: PLR0913 (a public signature: keyword options)
    shape: Shape,
    method: str,
    *,
    rank: int = 16,
    targets: Sequence[str] = LINEAR[:4],
    batch: int = 1,
    seq: int = 512,
    checkpointing: bool = False,
    qtype: str = "nf4",
) -> dict[str, float]:
    """Bytes of each part of one training step, and their ``total``.

    Args:
      shape: the model (``Shape(...)``, ``LLAMA_7B`` or ``Shape.from_params(n)``).
      method: one of ``METHODS``.
      rank, targets: the adapter (lora/qlora); default r16 on q, k, v, o.
      batch, seq: tokens per step.
      checkpointing: keep only layer inputs for the backward pass.
      qtype: qlora's base format, one of ``QTYPES`` (``"nf4"``, ``"int8"``, ``"int4"``,
        ``"fp8"``, ``"mxfp4"``, ``"nvfp4"``, ``"mxfp8"``, ``"fp8_block"``).

    Returns:
      ``{"weights", "gradients", "optimizer", "activations", "total"}`` in bytes.

    Raises:
      LoraError: an unknown ``method`` or ``qtype``.

    Examples:
      >>> from jlora.memory import LLAMA_7B, estimate
      >>> round(estimate(LLAMA_7B, "full-fp32")["optimizer"] / 1e9, 1)  # Adam: 8 bytes/param
      53.9
    """
    if method not in METHODS:
        raise LoraError(f"method={method!r} is not one of {METHODS}")
    bits = qbits(qtype, shape.hidden)
    n, lin = shape.params, shape.linear_params
    adapter = shape.lora_params(rank, targets) if method in ("lora", "qlora") else 0
    weights = {
        "full-fp32": 4 * n,
        "full-fp16": 2 * n,
        "lora": 2 * n,
        "qlora": lin * bits / 8 + 2 * (n - lin),
    }[method] + 4 * adapter
    trained = n if method.startswith("full") else adapter
    per = 2 if method == "full-fp16" else 4  # bytes per trained parameter
    act_bytes = 4 if method == "full-fp32" else 2
    tokens = batch * seq
    mlp = 4 * shape.intermediate * shape.mlp_visits + shape.experts  # (+ router logits)
    layer = tokens * act_bytes * (10 * shape.hidden + mlp + shape.heads * seq)
    kept = (
        shape.layers * tokens * act_bytes * shape.hidden + layer
        if checkpointing
        else shape.layers * layer
    )
    parts = dict(
        weights=weights,
        gradients=per * trained,
        optimizer=2 * per * trained,
        activations=kept + 8 * shape.vocab * tokens,
    )
    parts["total"] = sum(parts.values())
    return parts


#: The article's 7B table, and the settings under which the estimate reproduces it.
ARTICLE = {
    "full-fp32": (112, dict(checkpointing=True)),
    "full-fp16": (56, dict(checkpointing=True)),
    "lora": (28, dict(checkpointing=False)),
    "qlora": (6, dict(checkpointing=True)),
}
ARTICLE_TOKENS = dict(batch=4, seq=512)


def table(shape: Shape, rows: Sequence[tuple[str, str, dict]], **kw: Any) -> str:
    """A markdown table of :func:`estimate` for each row, as ``jlora memory`` prints it.

    Args:
      shape: the model, as :func:`estimate` takes it.
      rows: ``(label, method, settings)`` for each row; ``settings`` are keywords of
        :func:`estimate` for that row only.
      **kw: keywords of :func:`estimate` for every row (``batch``, ``seq``, ...).

    Returns:
      The table, one row per entry: weights, gradients, Adam, activations and total, in
      GB, or in MB when every total is under 1 GB.

    Raises:
      LoraError: a row's method or format is unknown (from :func:`estimate`).

    Examples:
      >>> from jlora.memory import LLAMA_7B, table
      >>> rows = [("LoRA r8", "lora", {"rank": 8}), ("QLoRA r8", "qlora", {"rank": 8})]
      >>> print(table(LLAMA_7B, rows, seq=256).splitlines()[0])
      | method | weights GB | gradients GB | Adam GB | activations GB | total GB |
    """
    results = [(label, estimate(shape, method, **{**kw, **extra})) for label, method, extra in rows]
    unit, size = ("GB", GB) if max(e["total"] for _, e in results) >= GB else ("MB", 2**20)
    lines = [
        f"| method | weights {unit} | gradients {unit} | Adam {unit} | activations {unit} "
        f"| total {unit} |",
        "|---|---|---|---|---|---|",
    ]
    for label, e in results:
        cells = " | ".join(
            f"{e[k] / size:.2f}"
            for k in ("weights", "gradients", "optimizer", "activations", "total")
        )
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)
