"""Every entry of the label tables, pinned against the protocol tables written out by hand."""
import numpy as np
import pytest

from cbst_jax import labels as L

# labelId -> trainId, from the Cityscapes label definition (labels.py of cityscapesScripts).
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11,
                 26: 12, 28: 13, 32: 14, 33: 15}
# labelId -> NTHU 13-class index (road, sidewalk, building, light, sign, vegetation, sky, person,
# rider, car, bus, motorcycle, bicycle), as the public cross-city loaders map the _eval.png maps.
NTHU_13 = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
SYNTHIA_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12,
              19: 13, 12: 14, 11: 15}


@pytest.mark.parametrize("lut, table", [
    (L.CITYSCAPES_ID_TO_TRAINID, CITYSCAPES_19),
    (L.CITYSCAPES_ID_TO_TRAINID16, CITYSCAPES_16),
    (L.SYNTHIA_ID_TO_TRAINID16, SYNTHIA_16),
    (L.CITYSCAPES_ID_TO_NTHU13, NTHU_13),
])
def test_every_entry(lut, table):
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    for label_id in range(256):
        assert lut[label_id] == table.get(label_id, 255), label_id


def test_trainid_order_is_not_reversed():
    # The Python-3 dict-order bug mapped trainId k to 18 - k; the round trip must be the identity.
    ids = np.array(L.CITYSCAPES_TRAINID_TO_ID)
    np.testing.assert_array_equal(L.CITYSCAPES_ID_TO_TRAINID[ids], np.arange(19))
    assert L.CITYSCAPES_CLASSES[0] == "road" and L.CITYSCAPES_CLASSES[18] == "bicycle"


def test_synthia_lanemarking_option():
    assert L.SYNTHIA_ID_TO_TRAINID16[22] == 255
    assert L.synthia_id_to_trainid16(lanemarking_as_road=True)[22] == 0
    assert L.SYNTHIA_ID_TO_TRAINID16[22] == 255  # the shared table is untouched


def test_subsets_and_palette():
    assert [L.SYNTHIA16_CLASSES[i] for i in range(16) if i not in L.MIOU13_OF_16] == ["wall", "fence", "pole"]
    assert L.NTHU13_CLASSES == ("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                                "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle")
    for i, t in enumerate(L.NTHU13_TRAINIDS):
        assert L.TRAINID_TO_NTHU13[t] == i
    assert (L.TRAINID_TO_NTHU13 != 255).sum() == 13
    np.testing.assert_array_equal(L.CITYSCAPES_ID_TO_NTHU13, L.TRAINID_TO_NTHU13[L.CITYSCAPES_ID_TO_TRAINID])
    assert [L.CITYSCAPES_CLASSES[t] for t in L.TRAINID16_TO_TRAINID19] == list(L.SYNTHIA16_CLASSES)
    assert tuple(L.CITYSCAPES_PALETTE[0]) == (128, 64, 128) and tuple(L.CITYSCAPES_PALETTE[10]) == (70, 130, 180)
    assert len({tuple(c) for c in L.CITYSCAPES_PALETTE}) == 19
    rgb = L.colorize(np.array([[0, 13, 255]], np.uint8))
    np.testing.assert_array_equal(rgb[0], [[128, 64, 128], [0, 0, 142], [0, 0, 0]])


def test_tables_are_read_only():
    with pytest.raises(ValueError):
        L.CITYSCAPES_ID_TO_TRAINID[0] = 1
