"""The algorithm base's batch sharding, without Ray."""

import numpy as np
import pytest

from rllib_policies.algorithm_base import nonempty_shards, shard_rows


@pytest.mark.parametrize(
    "groups, n_shards, expected",
    [
        (None, 2, [[0, 1, 2], [3, 4]]),
        ([7, 7, 9, 9, 4], 3, [[0, 1], [2, 3], [4]]),  # whole groups, in order of first sight
        ([7, 7, 7, 9, 9], 4, [[0, 1, 2], [3, 4]]),  # fewer groups than learners: no empty shard
        ([5, 5, 5, 5, 5], 2, [[0, 1, 2, 3, 4]]),
    ],
)
def test_shards_keep_groups_whole_and_are_never_empty(groups, n_shards, expected):
    g = None if groups is None else np.asarray(groups)
    shards = nonempty_shards(shard_rows(5, n_shards, g))
    assert [s.tolist() for s in shards] == expected
