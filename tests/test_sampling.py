from collections import Counter

import pytest

from contrastseg.engine.sampling import IterationBatchSampler
from contrastseg.errors import ConfigError


def test_each_epoch_is_a_permutation_and_batches_are_full():
    s = IterationBatchSampler(10, 3, iters=9, seed=1)
    batches = list(s)
    assert len(batches) == 9 and all(len(b) == 3 for b in batches)
    for epoch in range(3):  # 3 steps per epoch, the last sample of each epoch dropped
        idx = [i for b in batches[3 * epoch : 3 * epoch + 3] for e, i in b if e == epoch]
        assert len(idx) == 9 and len(set(idx)) == 9


def test_resume_draws_the_same_batches():
    full = list(IterationBatchSampler(17, 4, iters=20, seed=5))
    tail = list(IterationBatchSampler(17, 4, iters=20, seed=5, start=7))
    assert tail == full[7:]


def test_ranks_split_the_global_batch():
    full = list(IterationBatchSampler(16, 4, iters=6, seed=0))
    r0 = list(IterationBatchSampler(16, 4, iters=6, seed=0, rank=0, world_size=2))
    r1 = list(IterationBatchSampler(16, 4, iters=6, seed=0, rank=1, world_size=2))
    for f, a, b in zip(full, r0, r1, strict=True):
        assert Counter(a + b) == Counter(f)


def test_too_small_split_is_an_error():
    with pytest.raises(ConfigError, match="fewer than train.batch_size .* lower train.batch_size"):
        IterationBatchSampler(3, 4, iters=1, seed=0)
