"""What the interpreter did with each use of an adapted weight: typed records.

Every rule that meets an adapted weight records one :class:`Use` under the weight's
path (``Ctx.record``). ``jlora.explain`` renders them as text (``str(use)``); code
that needs to know (is every use gated? is one transposed against axes never
learned?) reads the fields, never the text.
"""

from __future__ import annotations

import dataclasses

#: What ``explain`` says of a factored use that contracts the adapter's out-axes: the
#: model uses the weight transposed against the layout ``init`` assumed (an Equinox
#: ``(out, in)`` weight initialised without ``fn``, a tied embedding's ``attend``).
TRANSPOSED = (
    "factored (transposed: the model contracts the adapter's out axes, so A and B "
    "play swapped roles; expected for a tied embedding's x @ E.T, otherwise learn "
    "the axes with jlora.init(key, params, cfg, fn, *example_args))"
)
#: The same for axes learned from ``fn`` or fixed by a file: a tied table's ``x @ E.T``.
TRANSPOSED_LEARNED = (
    "factored (transposed: the model contracts the adapter's out axes, so "
    "A and B play swapped roles, as a tied table's x @ E.T does)"
)
#: How a mixed-adapter batch serves a use, as ``explain`` says it after "factored".
GATHERED = " (mixed batch: each example gathers its adapter's factors)"
GROUPED = " (mixed batch: rows grouped by adapter)"
ONEHOT = " (mixed batch: one-hot contraction over the adapters)"
RANKED = " (mixed batch: each rank class at its own rank)"
#: A use whose low-rank path ``lora_mask`` gates per token.
GATED = " (gated by lora_mask)"


@dataclasses.dataclass(frozen=True)
class Use:
    """One use: ``kind`` is ``"factored"``, ``"transposed"`` (factored, the model
    contracting the adapter's out axes) or ``"materialized"``; ``how`` is the mixed-batch
    path of a factored use (:data:`GATHERED`, ...) or why a use materialized; ``gated``: its
    low-rank path is gated per token by ``lora_mask``; ``learned``: the axes were learned
    from ``fn`` or fixed by a file (a transposed use is then the model's own, a tied
    table's ``x @ E.T``), not assumed by ``init`` without ``fn``."""

    kind: str
    how: str = ""
    gated: bool = False
    learned: bool = True

    def __str__(self) -> str:
        if self.kind == "materialized":
            return "materialized" + (f" ({self.how})" if self.how else "")
        head = "factored" if self.kind == "factored" else self.transposed_text()
        return head + self.how + (GATED if self.gated else "")

    def transposed_text(self) -> str:
        return TRANSPOSED_LEARNED if self.learned else TRANSPOSED

    @property
    def unlearned_transpose(self) -> bool:
        """A transposed use by factors whose axes ``init`` assumed (made without ``fn``)."""
        return self.kind == "transposed" and not self.learned


FACTORED = Use("factored")
