"""The cosine metric on hand-computed cases."""

import math

import numpy as np
import pytest

from revsd.metrics import mean_cosine, row_cosines


def test_row_cosines_hand_computed_and_scale_free():
    pred = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    target = np.array([[2.0, 0.0], [-3.0, -4.0], [0.0, 5.0]])
    np.testing.assert_allclose(row_cosines(pred, target), [1.0, -1.0, 1 / math.sqrt(2)])
    assert mean_cosine(pred, target) == pytest.approx((1.0 - 1.0 + 1 / math.sqrt(2)) / 3)


def test_empty_and_zero_rows():
    assert math.isnan(mean_cosine(np.zeros((0, 384)), np.zeros((0, 384))))
    assert row_cosines(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0  # no division by zero
