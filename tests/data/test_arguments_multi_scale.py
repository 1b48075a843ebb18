"""multi_scale: the batch sizes it draws from are the stride multiples within imgsz +/- the share (True: 50%)."""

from yolotrain.data.augment import multi_scale_sizes


def test_sizes_are_the_stride_multiples_within_the_share():
    assert list(multi_scale_sizes(640, 32, 0.25)) == list(range(480, 801, 32))
    assert list(multi_scale_sizes(640, 32, True)) == list(range(320, 961, 32))


def test_range_ends_on_the_stride_survive_floating_point():
    assert multi_scale_sizes(640, 32, 0.7)[0] == 192  # 640 * (1 - 0.7) is 192.00000000000003 in floating point


def test_a_range_narrower_than_a_stride_keeps_imgsz_and_never_goes_below_one_stride():
    assert list(multi_scale_sizes(64, 32, 0.25)) == [64]
    assert list(multi_scale_sizes(64, 32, True)) == [32, 64, 96]
    assert list(multi_scale_sizes(32, 32, 0.9)) == [32]
