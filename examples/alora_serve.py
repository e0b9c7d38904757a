"""Serve several activated LoRAs (aLoRA) over one base, sharing the prompt's KV cache.

Run: python examples/alora_serve.py   (a tiny random Llama; a few seconds)

An activated LoRA acts only from its invocation sequence on, so every row's cache
before the invocation is the base model's. Here one shared prefix (a "document") is
prefilled once by the base alone; its cache is copied to every request, and each
request then continues with its own adapter's invocation and question, in one mixed
batch (``jlora.stack`` + ``adapter_ids``), then decodes a few tokens. The gate is
``lora_mask``: ``jlora.alora_mask`` of the whole sequence, cut to the chunk being run,
and each decode step continues a row's last entry.

Each request's logits are checked against that adapter run alone over its whole
sequence at once, without a cache (fp32).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama  # noqa: E402

import jlora  # noqa: E402

CONFIG = llama.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
INVOCATIONS = {"summarize": (1, 2), "translate": (1, 3), "critique": (4, 5)}
PREFIX, STEPS = 12, 4
# ids, positions, attention mask, cache (batch on axis 1), cache index
AXES = (0, 0, None, 1, None)


def adapters(params) -> dict:
    """One aLoRA per task (random factors stand in for trained ones)."""
    out = {}
    for i, (name, tokens) in enumerate(INVOCATIONS.items()):
        key = jax.random.key(10 + i)
        cfg = jlora.LoraConfig(
            rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), alora_invocation_tokens=tokens
        )
        ad = jlora.init(key, params, cfg)
        out[name] = jax.tree.map(lambda x: 0.2 * jax.random.normal(key, x.shape, x.dtype), ad)
    return out


def main():
    model, params = llama.Llama(CONFIG), llama.init_params(CONFIG, jax.random.key(0))
    ads = adapters(params)
    names = list(ads)
    stacked = jlora.stack([ads[n] for n in names])
    run = jax.jit(
        lambda st, ids, pos, cache, at, rows, mask: jlora.apply(model.apply)(
            params,
            st,
            ids,
            pos,
            None,
            cache,
            at,
            adapter_ids=rows,
            example_axes=AXES,
            lora_mask=mask,
        )
    )
    base = jax.jit(lambda ids, pos, cache: model.apply(params, ids, pos, None, cache, 0))

    rng = np.random.default_rng(0)
    prefix = rng.integers(8, 64, (1, PREFIX))  # the shared document
    requests = ["summarize", "critique", "translate", "summarize"]
    rows = jnp.array([names.index(r) for r in requests])
    tail = np.stack([list(INVOCATIONS[r]) + list(rng.integers(8, 64, 3)) for r in requests])
    n = PREFIX + tail.shape[1] + STEPS
    pos = lambda a, b: jnp.broadcast_to(jnp.arange(a, b)[None], (len(requests), b - a))

    # 1. the base prefills the shared prefix once, for one row
    _, cache = base(jnp.asarray(prefix), pos(0, PREFIX)[:1], llama.init_cache(CONFIG, 1, n))
    cache = tuple(jnp.repeat(c, len(requests), axis=1) for c in cache)  # every request's
    # 2. each request's invocation and question, through its own adapter
    ids = np.concatenate([np.repeat(prefix, len(requests), 0), tail], axis=1)
    mask = jlora.alora_mask(ids, stacked, adapter_ids=rows)
    assert not bool(mask[:, :PREFIX].any())  # the prefix is the base's for every request
    logits, cache = run(
        stacked,
        jnp.asarray(tail),
        pos(PREFIX, ids.shape[1]),
        cache,
        jnp.int32(PREFIX),
        rows,
        mask[:, PREFIX:],
    )
    got = [logits]
    # 3. decode greedily, each step continuing its row's last mask entry
    for t in range(ids.shape[1], n):
        tok = got[-1][:, -1].argmax(-1)[:, None]
        ids = np.concatenate([ids, np.asarray(tok)], axis=1)
        logits, cache = run(stacked, tok, pos(t, t + 1), cache, jnp.int32(t), rows, mask[:, -1:])
        got.append(logits)
    got = jnp.concatenate(got, axis=1)

    alone = jax.jit(jlora.apply(model.apply))
    worst = effect = 0.0
    for i, r in enumerate(requests):  # the whole sequence through that adapter, no cache
        one = ids[i : i + 1]
        want = alone(params, ads[r], jnp.asarray(one), lora_mask=jlora.alora_mask(one, ads[r]))
        worst = max(worst, float(jnp.abs(got[i] - want[0, PREFIX:]).max()))
        effect = max(effect, float(jnp.abs(want - model.apply(params, jnp.asarray(one))).max()))
    ok = worst < 1e-5 and effect > 1e-2
    print(
        f"{len(requests)} requests over {len(names)} aLoRA adapters, one shared prefix of "
        f"{PREFIX} tokens prefilled once by the base"
    )
    print(
        f"max |logit - adapter alone without cache| = {worst:.2e}: "
        f"{'all requests equal their adapter alone' if ok else 'MISMATCH'} (the adapters "
        f"move the logits by up to {effect:.2f})"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
