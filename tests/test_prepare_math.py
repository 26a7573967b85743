"""Eq. 5-7 (motion intensity), eq. 9 (region masks), sampling and resampling against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from motioncharacter.components.prepare.flow import flow_magnitude, motion_intensity, pair_intensity, region_masks
from motioncharacter.components.prepare.resample import balance_weights, bin_index, cap
from motioncharacter.video import sample_indices


def test_pair_intensity_thresholds_at_the_mean():
    # tau = (0+0+0+4)/4 = 1 -> only the 4 is foreground -> f_fg = 4/1
    assert pair_intensity(np.array([[0.0, 0.0], [0.0, 4.0]])) == 4.0
    # tau = 2 -> the two 3s are foreground -> (3+3)/2
    assert pair_intensity(np.array([[1.0, 1.0], [3.0, 3.0]])) == 3.0
    # uniform flow: nothing exceeds the mean, S = 0 -> 0 by definition
    assert pair_intensity(np.full((3, 3), 2.0)) == 0.0


def test_motion_intensity_is_the_mean_over_pairs():
    mags = np.array([[[0.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [3.0, 3.0]]])
    assert motion_intensity(mags) == pytest.approx(3.5)
    assert motion_intensity(np.zeros((0, 2, 2))) == 0.0


def test_flow_magnitude():
    flow = np.array([[[3.0, 4.0], [0.0, -2.0]]])
    np.testing.assert_allclose(flow_magnitude(flow), [[5.0, 2.0]])


def test_region_masks_eq9_normalised_and_raw():
    mags = np.array([[[0.0, 100.0], [200.0, 50.0]]])  # tau = 87.5 -> foreground 100, 200
    # normalised: fg * 255/200 -> [0, 127.5, 255, 0]; /255 + .5 -> [.5, 1, 1.5, .5]; clip [1, 1.5]
    m = region_masks(mags)
    assert m.shape == (2, 2, 2)  # one mask per frame: N-1 pairs -> N frames
    np.testing.assert_allclose(m[0], [[1.0, 1.0], [1.5, 1.0]])
    np.testing.assert_allclose(m[1], m[0])  # the last frame repeats the last pair
    # raw pixels: 200/255 + .5 = 1.2843, 100/255 + .5 = 0.892 -> 1.0
    raw = region_masks(mags, normalize=False)
    np.testing.assert_allclose(raw[0], [[1.0, 1.0], [200 / 255 + 0.5, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError):
        region_masks(np.zeros((0, 2, 2)))


def test_sample_indices_at_4fps():
    assert sample_indices(100, 25.0, 4.0, 4) == [0, 6, 12, 19]
    assert sample_indices(40, 8.0, 4.0, 16) == list(range(0, 32, 2))
    assert sample_indices(10, 25.0, 4.0, 16) == [0, 6]  # never past the end
    with pytest.raises(ValueError):
        sample_indices(10, 0.0, 4.0, 16)


def test_resampling_balances_bins():
    m = np.array([0.0, 0.0, 0.0, 5.0])  # bins of width 2: three clips in bin 0, one in bin 2
    np.testing.assert_array_equal(bin_index(m, 10), [0, 0, 0, 2])
    w = balance_weights(m, bins=10)
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert w.sum() == pytest.approx(1.0)
    # each non-empty bin gets the same total probability
    assert w[:3].sum() == pytest.approx(w[3])


def test_cap_at_20():
    assert cap(37.2) == 20.0 and cap(-1.0) == 0.0 and cap(7.5) == 7.5
    assert bin_index(np.array([20.0]), 10)[0] == 9
