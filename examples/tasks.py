"""Character-level tasks, generated in-process: nothing is downloaded.

Every example is ``prompt SEP answer`` with a fixed length, so a batch is a plain
``(batch, 2 * length + 1)`` int array. The prompt is ``length`` distinct
lowercase letters and never says which task it is; only the answer differs:

    copy     qfxbm|qfxbm        reverse  qfxbm|mbxfq      sort  qfxbm|bfmqx
    upper    qfxbm|QFXBM        caesar   qfxbm|tiaep      (shift by 3)

The base model is pretrained on ``copy`` of mixed-case strings of random
lengths, padded in front (`base_batch`, e.g. ``..qEydQT|qEydQT..``): it learns
the format, every letter, and to find its place in the prompt by content
rather than by a fixed offset, but it cannot tell the other tasks apart. (With
fixed-length copy the base learns a fixed offset, and a q,k,v,o adapter then
struggles to learn ``reverse``.) Loss and accuracy count answer tokens only.
"""

import string

import jax
import jax.numpy as jnp

LETTERS = 26  # Token ids 0-25 are a-z, 26-51 are A-Z.
SEP = 2 * LETTERS  # Separates prompt and answer.
PAD = SEP + 1  # Fills the front of shorter prompts in the pretraining mix.
VOCAB = PAD + 1
MIN_BASE_LENGTH = 2  # Shortest prompt in the pretraining mix.
DATA_VERSION = 1  # Bump when the data changes, so cached bases are retrained.
CAESAR_SHIFT = 3
CHARS = string.ascii_lowercase + string.ascii_uppercase + "|."  # by token id

# Each task maps a (batch, length) array of letter ids to its answer ids.
TASKS = {
    "copy": lambda x: x,
    "reverse": lambda x: x[:, ::-1],
    "sort": lambda x: jnp.sort(x, axis=1),
    "upper": lambda x: x + LETTERS,
    "caesar": lambda x: (x + CAESAR_SHIFT) % LETTERS,
}


def _distinct(key, batch: int, length: int, alphabet: int) -> jax.Array:
    """Returns (batch, length) ids: `length` distinct ids below `alphabet` per row."""
    return jnp.argsort(jax.random.uniform(key, (batch, alphabet)), axis=1)[:, :length]


def _join(prompt: jax.Array, answer: jax.Array) -> jax.Array:
    sep = jnp.full((prompt.shape[0], 1), SEP, prompt.dtype)
    return jnp.concatenate([prompt, sep, answer], axis=1)


def answer_mask(batch: int, length: int) -> jax.Array:
    """Returns the (batch, 2 * length) float mask of answer targets.

    Targets are ``ids[:, 1:]``; target ``t`` is an answer token when ``t >= length``.
    """
    mask = jnp.arange(2 * length) >= length
    return jnp.broadcast_to(mask, (batch, 2 * length)).astype(jnp.float32)


def task_batch(key, task: str, batch: int, length: int):
    """Returns ``(ids, mask)`` for one task: lowercase prompts, its answers."""
    prompt = _distinct(key, batch, length, LETTERS)
    return _join(prompt, TASKS[task](prompt)), answer_mask(batch, length)


def base_batch(key, batch: int, length: int):
    """Returns ``(ids, mask)`` of the pretraining mix: copy, over both cases.

    Prompts have random lengths (padded in front), so the base cannot copy by
    a fixed offset: it learns to find the current letter and copy the next.
    """
    letters_key, length_key = jax.random.split(key)
    letters = _distinct(letters_key, batch, length, 2 * LETTERS)
    k = jax.random.randint(length_key, (batch, 1), MIN_BASE_LENGTH, length + 1)
    pos = jnp.arange(length)
    prompt = jnp.where(pos < length - k, PAD, letters)
    src = jnp.minimum(length - k + pos, length - 1)
    answer = jnp.where(pos < k, jnp.take_along_axis(letters, src, axis=1), PAD)
    mask = jnp.concatenate([jnp.zeros((batch, length)), (pos < k).astype(jnp.float32)], 1)
    return _join(prompt, answer), mask


def decode(ids) -> str:
    """Returns the characters of a 1-D id sequence (SEP shown as ``|``)."""
    return "".join(CHARS[int(i)] for i in ids)
