"""`check_units_per_stage`: layer widths shared by every stage or given per stage."""

import numpy as np
import pytest

from keras_moe.validation import check_units_per_stage
from keras_moe.validation import is_per_stage


@pytest.mark.parametrize(
    "value, expected",
    [
        (4, ((4,), (4,), (4,))),
        ([4, 2], ((4, 2),) * 3),
        ((np.int64(3),), ((3,),) * 3),
        ([[4, 2], [3], [1]], ((4, 2), (3,), (1,))),
        ([[4, 2], 3, (1,)], ((4, 2), (3,), (1,))),
    ],
)
def test_widths_shared_or_per_stage(value, expected):
    result = check_units_per_stage("units", value, 3)
    assert result == expected
    assert all(type(w) is int for stage in result for w in stage)


def test_is_per_stage():
    assert not is_per_stage(4) and not is_per_stage([4, 2]) and not is_per_stage([])
    assert is_per_stage([[4], [2]]) and is_per_stage(([4], 2))


@pytest.mark.parametrize(
    "value, message",
    [
        ([], "`units` must be a positive integer or a non-empty list"),
        ([[4], [2]], "one entry per stage \\(3\\)"),
        ([[4], [], [2]], "`units\\[1\\]`"),
        ([[4], [2], -1], "`units\\[2\\]`"),
        ([True], "`units`"),
    ],
)
def test_invalid_widths(value, message):
    with pytest.raises(ValueError, match=message):
        check_units_per_stage("units", value, 3)
