"""A fixed-seed slice of the differential test (``tests/differential.py``).

Each seed is a random small program over the weight uses jlora has rules for; its
outputs (eager and jitted) and jitted adapter gradients must equal the same
function's on the merged weights, or jlora must refuse it with a ``LoraError``.
A wrong number or any other exception fails. The long run is
``python tests/differential.py 0 1000``.
"""

import differential
import pytest

CHUNK, CHUNKS = 8, 6  # 48 programs, about 3 s each on one core


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_programs_equal_the_merged_weights_or_are_refused(chunk):
    seeds = range(chunk * CHUNK, (chunk + 1) * CHUNK)
    verdicts = {s: differential.verdict(s) for s in seeds}
    bad = {
        s: v
        for s, v in verdicts.items()
        if v[0] not in ("right", "refused") and not v[0].startswith("invalid")
    }
    assert not bad, bad
    # the slice keeps testing numbers: most programs run (refusals are mixed batches
    # whose weight is used other than by a dot, measured 9 of 120)
    right = sum(v[0] == "right" for v in verdicts.values())
    assert right >= CHUNK // 2, verdicts
