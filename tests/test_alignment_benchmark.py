"""The alignment benchmark's measure (how far a prediction lies from its truth) and its 'before'."""

from __future__ import annotations

import numpy as np
import pytest


def test_offset_is_how_far_a_prediction_lies_from_its_truth_ignoring_distant_false_positives(alignment) -> None:
    yy, xx = np.mgrid[0:96, 0:96]
    truth = (yy - 40) ** 2 + ((xx - 35) / 1.5) ** 2 <= 100
    for down, right in ((0, 0), (2, 0), (-3, 1), (1, -4)):
        predicted = np.roll(truth, (down, right), axis=(0, 1))
        predicted[85:90, 85:90] = True  # a false positive far from the lesion
        assert alignment.offset(predicted, truth) == pytest.approx((down, right))
    assert alignment.offset(np.zeros_like(truth), truth) is None


def test_the_old_nearest_resampling_is_what_the_engine_did(alignment) -> None:
    """The benchmark's 'before' must be the old rule: each 4×4 block's top-left pixel."""
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 0, 0] = True  # only the top-left pixel of the first block
    np.testing.assert_array_equal(alignment._nearest(mask, 2)[0].numpy(), [[True, False], [False, False]])
    mask[0, 0, 0], mask[0, 1, 1] = False, True  # inside the block but not its top-left: lost
    assert not alignment._nearest(mask, 2).any()


def test_each_job_sets_its_resampling_both_ways(alignment) -> None:
    """A pool worker runs several jobs: the first version left 'nearest' in place for the next 'grid' job."""
    from fedmix_engine.data import tensors

    engine = tensors.resize_channels
    try:
        alignment.use_resampling("nearest")
        assert tensors.resize_channels is alignment._nearest
        alignment.use_resampling("grid")
        assert tensors.resize_channels is engine
    finally:
        tensors.resize_channels = engine
