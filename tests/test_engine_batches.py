"""The micro-batch stream of the offline algorithms (``_common.micro_batches``)."""

import itertools
import random

import pytest

from fastpo.engine.algorithms._common import micro_batches
from fastpo.engine.config import ConfigError


def _reference(n_rows: int, batch_size: int, seed: int, position: int) -> list[int]:
    """Micro-batch ``position``: the epoch's own shuffle of every row, cut in batches,
    the last incomplete one dropped."""
    per_epoch = n_rows // batch_size
    epoch, index = divmod(position, per_epoch)
    order = list(range(n_rows))
    random.Random(f"batches/{seed}/{epoch}").shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]


@pytest.mark.parametrize("start", [0, 1, 3, 4, 9])
def test_the_stream_from_any_position_is_the_epochs_shuffle(start):
    rows = list(range(23))  # 4 batches of 5 an epoch, 3 rows dropped
    stream = micro_batches(rows, 5, seed=7, collate=list)
    got = list(itertools.islice(stream(start), 10))  # crosses two epoch boundaries
    assert got == [_reference(23, 5, 7, start + k) for k in range(10)]
    assert all(len(set(batch)) == 5 for batch in got)
    assert got[0] != _reference(23, 5, 8, start)  # the seed matters


def test_more_rows_per_batch_than_rows_is_a_config_error():
    with pytest.raises(ConfigError, match="option 'batch_size': got 6, more than the 5 training rows"):
        micro_batches(list(range(5)), 6, seed=0, collate=list)
