"""characterizeImage's fast background mask (issue 4): one pass of row-wise maxima gives the
same pixels as the alternating 4-/8-connected unit dilations it replaces."""

import numpy as np
import pytest
from scipy import ndimage

from diapipe.calibrate.characterize import background_mask
from diapipe.exposure.masks import MASK_DTYPE, bit


def _reference(mask, grow_pix):
    out = mask.copy()
    detected = (out & bit("DETECTED")) != 0
    cross = ndimage.generate_binary_structure(2, 1)
    square = ndimage.generate_binary_structure(2, 2)
    for k in range(grow_pix):
        detected = ndimage.binary_dilation(detected, structure=square if k % 2 else cross)
    out[detected] |= MASK_DTYPE(bit("DETECTED"))
    return out


@pytest.mark.parametrize("grow_pix", [1, 2, 3, 4, 5, 8])
def test_background_mask_equals_iterated_dilations(grow_pix):
    rng = np.random.default_rng(grow_pix)
    mask = np.zeros((57, 43), MASK_DTYPE)
    mask[rng.random(mask.shape) < 0.01] |= MASK_DTYPE(bit("DETECTED"))
    mask[0, 3] |= MASK_DTYPE(bit("DETECTED"))  # on the border: the octagon is cut, not wrapped
    mask[rng.random(mask.shape) < 0.05] |= MASK_DTYPE(bit("BAD"))
    grown = background_mask(mask, grow_pix)
    assert np.array_equal(grown, _reference(mask, grow_pix))
    assert grown is not mask and np.array_equal(mask & ~MASK_DTYPE(bit("DETECTED")), grown & ~MASK_DTYPE(bit("DETECTED")))
