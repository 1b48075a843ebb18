"""The device augmentation keeps boxes and pixels together, matches OpenCV's warp and the CPU pipeline's box
statistics, and trains end to end. Everything runs on the CPU (torch): the same code runs on CUDA."""

import random

import cv2
import numpy as np
import pytest
import torch
from test_augment import (
    IMGSZ,
    PALETTE,
    FakeDataset,
    assert_boxes_on_colours,
    assert_boxes_valid,
    assert_visible_objects_kept,
    box_areas,
    centre_fraction,
    make_hyp,
)

from yolotrain import DetectionTrainer
from yolotrain.data.augment import Compose, Format, LetterBox, RandomHSV, RandomPerspective
from yolotrain.data.dataset import YOLODataset
from yolotrain.data.instances import Instances
from yolotrain.data.device_augment import (
    DeviceAugment,
    DeviceAugmentDataset,
    _RecordInput,
    _hsv_jitter,
    _warp_images,
    _warped_labels,
    batch_seed,
    check_device_augment,
    jpeg_decoder_for,
)
from yolotrain.data.loader import collate_fn
from yolotrain.errors import CfgError
from yolotrain.utils.boxes import xywhn2xyxy


def device_batch(dataset, indices=None, seed=0):
    """A collated batch of `dataset` samples as DeviceAugmentDataset makes them (padded, with seeds)."""
    pipeline = Compose([_RecordInput(), LetterBox((dataset.imgsz, dataset.imgsz), center=False), Format()])
    samples = []
    for i in indices if indices is not None else range(len(dataset)):
        random.seed(seed * 1000 + i)
        samples.append(pipeline(dataset.get_image_and_label(i)))
    return collate_fn(samples)


def augmented(hyp, dataset=None, seed=0, indices=None):
    dataset = dataset or FakeDataset()
    batch = device_batch(dataset, indices, seed)
    return DeviceAugment(dataset.imgsz, hyp).preprocess(batch, "cpu")


def per_image(out):
    """[(BGR HWC uint8 image, cls (n, 1), pixel xyxy boxes (n, 4))] of an augmented batch."""
    images = (out["img"] * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()[..., ::-1]
    result = []
    for b, img in enumerate(images):
        chosen = (out["batch_idx"] == b).numpy()
        h, w = img.shape[:2]
        boxes = xywhn2xyxy(out["bboxes"].numpy()[chosen], w, h)
        result.append((np.ascontiguousarray(img), out["cls"].numpy()[chosen], boxes.astype(np.float32)))
    return result


# ---------------------------------------------------------------------------------------------------------------
# boxes on pixels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_scale_translate_and_flips_keep_axis_aligned_boxes_exact(mosaic):
    dataset = FakeDataset()
    areas = box_areas(dataset)
    hyp = make_hyp(mosaic=mosaic, translate=0.2, scale=0.5, fliplr=0.5, flipud=0.5)
    for seed in range(8):
        out = augmented(hyp, dataset, seed)
        assert out["img"].shape == (len(dataset), 3, IMGSZ, IMGSZ) and out["img"].dtype == torch.float32
        assert out["max_boxes"] == int(torch.bincount(out["batch_idx"].long()).max())
        for img, cls, boxes in per_image(out):
            assert_boxes_valid(boxes, img.shape, min_size=2.0)
            assert_boxes_on_colours(img, cls, boxes, position_tol=1.5)
            if mosaic == 0:  # no cropping by a canvas: every object still mostly visible keeps its box
                # kept unless less than 10% of its scaled area (<= 2.25x) is visible: 56% of the original always is
                assert_visible_objects_kept(img, cls, areas, {c: a * 2.25 for c, a in areas.items()})


@pytest.mark.parametrize(
    "gains",
    [
        dict(degrees=10.0, translate=0.1, scale=0.0, shear=0.0, perspective=0.0),
        dict(degrees=0.0, translate=0.1, scale=0.0, shear=6.0, perspective=0.0),
        dict(degrees=8.0, translate=0.2, scale=0.4, shear=3.0, perspective=0.0),
        dict(degrees=5.0, translate=0.1, scale=0.3, shear=2.0, perspective=0.0008),
    ],
)
def test_rotation_shear_perspective_keep_boxes_on_objects(gains):
    for seed in range(5):
        for img, cls, boxes in per_image(augmented(make_hyp(mosaic=0.0, **gains), seed=seed)):
            assert_boxes_valid(boxes, img.shape, min_size=2.0)
            assert_boxes_on_colours(img, cls, boxes, min_fraction=0.85, position_tol=2.5, border_boxes="loose")
        # In a mosaic, tiles cut boxes inside the image too, and a rotated cut box encloses background: each box
        # must still hold its object's colour.
        for img, cls, boxes in per_image(augmented(make_hyp(mosaic=1.0, **gains), seed=seed)):
            assert_boxes_valid(boxes, img.shape, min_size=2.0)
            for c, box in zip(cls.reshape(-1).astype(int), boxes):
                assert centre_fraction(img, box, PALETTE[c], shrink=0.0) > 0.15, (c, box)


def test_mosaic_tiles_come_from_the_batch_and_close_mosaic_keeps_each_image_alone():
    dataset = FakeDataset()
    own_classes = [set(dataset.get_image_and_label(i)["cls"].reshape(-1).astype(int)) for i in range(len(dataset))]
    augment = DeviceAugment(IMGSZ, make_hyp(mosaic=1.0, mixup=0.5))
    mixed_in = 0
    for seed in range(6):
        out = augment.preprocess(device_batch(dataset, seed=seed), "cpu")
        mixed_in += sum(not set(cls.reshape(-1).astype(int)) <= own for (_, cls, _), own in
                        zip(per_image(out), own_classes))
    assert mixed_in > 0  # mosaic tiles bring other images' objects
    augment.close_mosaic()
    for seed in range(6):
        out = augment.preprocess(device_batch(dataset, seed=seed), "cpu")
        for (img, cls, boxes), own in zip(per_image(out), own_classes):
            assert set(cls.reshape(-1).astype(int)) <= own
            assert_boxes_on_colours(img, cls, boxes, position_tol=1.5)


def test_mixup_blends_two_outputs_of_the_batch_and_keeps_both_box_sets():
    dataset = FakeDataset()
    hyp = make_hyp(mosaic=1.0, fliplr=0.5)
    plain = augmented(hyp, dataset, seed=3)
    mixed = augmented({**vars(hyp), "mixup": 1.0}, dataset, seed=3)  # same seed: the same draws, mixup on
    generator = torch.Generator().manual_seed(batch_seed(device_batch(dataset, seed=3)["augment_seed"]))
    draws = DeviceAugment(IMGSZ, {**vars(hyp), "mixup": 1.0})._draw(len(dataset), generator)
    partner, ratio = draws["mixup_partner"], draws["mixup_ratio"].float().view(-1, 1, 1, 1)
    expected = plain["img"] * ratio + plain["img"][partner] * (1 - ratio)
    torch.testing.assert_close(mixed["img"], expected, atol=1e-5, rtol=0)
    assert 0.3 < float(ratio.min()) and float(ratio.max()) < 0.7  # Beta(32, 32) stays near 1/2
    counts = torch.bincount(plain["batch_idx"].long(), minlength=len(dataset))
    mixed_counts = torch.bincount(mixed["batch_idx"].long(), minlength=len(dataset))
    assert torch.equal(mixed_counts, counts + counts[partner])


def test_a_batch_of_one_and_a_batch_without_boxes():
    dataset = FakeDataset()
    hyp = make_hyp(mosaic=1.0, mixup=1.0, degrees=5.0)
    single = augmented(hyp, dataset, indices=[2])
    assert single["img"].shape == (1, 3, IMGSZ, IMGSZ) and torch.all(single["batch_idx"] == 0)
    batch = device_batch(dataset)
    empty = {**batch, "cls": batch["cls"][:0], "bboxes": batch["bboxes"][:0], "batch_idx": batch["batch_idx"][:0],
             "max_boxes": 0}
    out = DeviceAugment(IMGSZ, hyp).preprocess(empty, "cpu")
    assert out["img"].shape[0] == len(dataset) and out["bboxes"].shape == (0, 4) and out["cls"].shape == (0, 1)
    assert out["max_boxes"] == 0


def test_horizontal_flip_mirrors_pixels_and_boxes_of_the_same_draw():
    dataset = FakeDataset()
    base = dict(vars(make_hyp(mosaic=1.0, degrees=5.0, shear=2.0)), fliplr=0.0)
    plain = augmented(base, dataset, seed=1)
    flipped = augmented({**base, "fliplr": 1.0}, dataset, seed=1)
    differs = (flipped["img"] - plain["img"].flip(-1)).abs() > 1e-3  # a pixel exactly on a tile edge may round over
    assert differs.float().mean() < 1e-3
    mirrored = plain["bboxes"].clone()
    mirrored[:, 0] = 1 - mirrored[:, 0]
    torch.testing.assert_close(flipped["bboxes"], mirrored, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# agreement with the CPU transforms
# ---------------------------------------------------------------------------------------------------------------


def test_without_gains_the_output_is_the_cpu_letterbox():
    dataset = FakeDataset()
    out = augmented(make_hyp(mosaic=0.0, translate=0.0, scale=0.0, fliplr=0.0), dataset)
    for i, (img, cls, boxes) in enumerate(per_image(out)):
        expected = LetterBox((IMGSZ, IMGSZ))(dataset.get_image_and_label(i))
        assert np.array_equal(img, expected["img"])
        np.testing.assert_allclose(boxes, expected["bboxes"], atol=1e-3)


@pytest.mark.parametrize("gains", [dict(degrees=12.0, translate=0.2, scale=0.5, shear=4.0, perspective=0.0),
                                   dict(degrees=5.0, translate=0.1, scale=0.3, shear=2.0, perspective=0.0008)])
def test_warp_matches_opencv_for_the_same_matrix(gains):
    """Pixels and boxes through one RandomPerspective matrix: the device warp against cv2.warpAffine/Perspective."""
    dataset = FakeDataset()
    letterboxed = [LetterBox((IMGSZ, IMGSZ))(dataset.get_image_and_label(i)) for i in range(len(dataset))]
    transform = RandomPerspective(**gains)
    random.seed(0)
    matrices = [transform._random_matrix((IMGSZ, IMGSZ), (IMGSZ, IMGSZ))[0] for _ in letterboxed]
    rgb = torch.stack([torch.from_numpy(s["img"][..., ::-1].transpose(2, 0, 1).copy()) for s in letterboxed])
    layout = {  # single images filling their canvas
        "tiles": torch.arange(len(rgb))[:, None].repeat(1, 4),
        "origin": torch.zeros(len(rgb), 4, 2, dtype=torch.float64),
        "centre": torch.full((len(rgb), 2), 1e9, dtype=torch.float64),
        "canvas_size": torch.full((len(rgb),), float(IMGSZ), dtype=torch.float64),
    }
    matrix = torch.from_numpy(np.stack(matrices))
    warped = _warp_images(rgb, layout, torch.linalg.inv(matrix).float(), IMGSZ)
    for sample, m, img in zip(letterboxed, matrices, warped):
        expected = RandomPerspective._warp(sample["img"], m, (IMGSZ, IMGSZ))[..., ::-1].astype(np.float64)
        difference = np.abs(img.permute(1, 2, 0).numpy() - expected)
        assert difference.mean() < 0.05 and difference.max() < 1.0  # OpenCV rounds to uint8 (measured: 0.51)
    boxes = torch.from_numpy(np.stack([s["bboxes"] for s in letterboxed])).float()
    warped_boxes = _warped_labels(
        {"cls": torch.zeros(boxes.shape[:2]), "boxes": boxes, "mask": torch.ones(boxes.shape[:2], dtype=torch.bool)},
        matrix, torch.ones(len(boxes), dtype=torch.float64), IMGSZ,
    )["boxes"]
    for sample, m, got in zip(letterboxed, matrices, warped_boxes):
        expected = np.clip(Instances(sample["bboxes"]).transform(m).bboxes, 0, IMGSZ)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-3)


def test_hsv_follows_opencv_hsv_lookup_tables():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    gains = (0.015, 0.7, 0.4)
    random.seed(5)
    expected = RandomHSV(*gains)({"img": bgr[0].copy()})["img"]
    random.seed(5)
    hue_gain, sat_gain, val_gain = (random.uniform(-1, 1) * g + 1 for g in gains)
    rgb = torch.from_numpy(bgr[..., ::-1].transpose(0, 3, 1, 2).copy()).float()
    got = _hsv_jitter(rgb, torch.tensor([[hue_gain, sat_gain, val_gain]]))[0].permute(1, 2, 0).numpy()[..., ::-1]
    difference = np.abs(got - expected.astype(np.float64))
    assert np.median(difference) <= 2 and difference.mean() < 3  # OpenCV rounds hue to 2 degrees, S and V to 8 bits
    unchanged = _hsv_jitter(rgb, torch.ones(1, 3))
    torch.testing.assert_close(unchanged, rgb, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    from yolotrain.data.builtin import generate_shapes_dataset
    from yolotrain.data.data_yaml import check_det_dataset

    data = check_det_dataset(str(generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), 64, 1, imgsz=128)))
    return data


def test_box_sizes_follow_the_cpu_pipeline_distribution(shapes_train):
    """Box widths and heights over ~400 augmented samples of the built-in dataset: the quartiles of both paths agree
    within 7%, and so does the number of boxes per image."""
    from yolotrain.cfg import get_cfg

    hyp = get_cfg()
    kwargs = dict(imgsz=128, augment=True, hyp=hyp, data=shapes_train, workers=0)
    cpu_dataset = YOLODataset(shapes_train["train"], **kwargs)
    device_dataset = DeviceAugmentDataset(shapes_train["train"], **kwargs)
    rounds = 6

    cpu_boxes, cpu_counts = [], []
    for r in range(rounds):
        for i in range(len(cpu_dataset)):
            sample = cpu_dataset[(i, r * 10_000 + i)]
            cpu_boxes.append(sample["bboxes"].numpy()[:, 2:] * 128)
            cpu_counts.append(len(sample["bboxes"]))
    device_boxes, device_counts = [], []
    for r in range(rounds):
        for start in range(0, len(device_dataset), 16):
            batch = collate_fn([device_dataset[(i, r * 10_000 + i)] for i in range(start, start + 16)])
            out = device_dataset.device_augment.preprocess(batch, "cpu")
            device_boxes.append(out["bboxes"].numpy()[:, 2:] * 128)
            device_counts += torch.bincount(out["batch_idx"].long(), minlength=16).tolist()
    cpu_sizes, device_sizes = np.concatenate(cpu_boxes), np.concatenate(device_boxes)
    quantiles = [0.25, 0.5, 0.75]
    cpu_q, device_q = np.quantile(cpu_sizes, quantiles, axis=0), np.quantile(device_sizes, quantiles, axis=0)
    np.testing.assert_allclose(device_q, cpu_q, rtol=0.07)  # measured: within 3%; 15% larger scales fail it
    assert abs(np.mean(device_counts) / np.mean(cpu_counts) - 1) < 0.08


# ---------------------------------------------------------------------------------------------------------------
# loader side, choice and training
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_serves_padded_uint8_images_with_their_size_and_a_reproducible_seed(shapes_train):
    dataset = DeviceAugmentDataset(shapes_train["train"], imgsz=128, augment=True, data=shapes_train, workers=0)
    sample = dataset[(3, 42)]
    assert sample["img"].dtype == torch.uint8 and tuple(sample["img"].shape) == (3, 128, 128)
    h, w = sample["content_shape"]
    assert max(h, w) == 128
    assert torch.all(sample["img"][:, h:] == 114) and torch.all(sample["img"][:, :, w:] == 114)
    assert sample["augment_seed"] == dataset[(3, 42)]["augment_seed"] != dataset[(3, 43)]["augment_seed"]
    batch = collate_fn([dataset[(i, i)] for i in range(4)])
    first = dataset.device_augment.preprocess(dict(batch), "cpu")
    again = dataset.device_augment.preprocess(dict(batch), "cpu")
    assert torch.equal(first["img"], again["img"]) and torch.equal(first["bboxes"], again["bboxes"])


def cv2_decoder(encoded, device):
    """Stands in for the nvjpeg decoder (no torchvision or CUDA here): OpenCV, ignoring EXIF orientation as nvjpeg."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    images = [cv2.imdecode(e.numpy(), flags)[..., ::-1].transpose(2, 0, 1).copy() for e in encoded]
    return [torch.from_numpy(image).to(device) for image in images]


@pytest.fixture
def jpeg_train(tmp_path, exif_jpeg):
    """8 noise JPEGs of 96 x 128 with two boxes each, EXIF orientations 1 to 8, as a data dict."""
    from yolotrain.data.data_yaml import check_det_dataset

    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    for i in range(8):
        noise = np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        (tmp_path / "images" / "train" / f"{i}.jpg").write_bytes(exif_jpeg(noise, orientation=i + 1))
        (tmp_path / "labels" / "train" / f"{i}.txt").write_text(f"{i % 3} 0.3 0.4 0.2 0.3\n1 0.7 0.6 0.3 0.2\n")
    (tmp_path / "data.yaml").write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/train\nnames: [a, b, c]\n")
    return check_det_dataset(str(tmp_path / "data.yaml"))


@pytest.mark.parametrize("imgsz", [128, 64])  # the files' own size, and a downscale done after decoding
def test_jpeg_bytes_decoded_with_the_batch_give_the_batch_of_decoded_samples(jpeg_train, imgsz, monkeypatch):
    # The workers decode a large JPEG at a fraction of its size (the DCT's scaling), the device decodes it whole
    # and downscales: on these noise images the two resamplings differ by ~6 levels, so the workers decode whole.
    monkeypatch.setattr("yolotrain.data.dataset.JPEG_REDUCTIONS", {})
    kwargs = dict(imgsz=imgsz, augment=True, data=jpeg_train, workers=0)
    decoded = DeviceAugmentDataset(jpeg_train["train"], **kwargs)
    encoded = DeviceAugmentDataset(jpeg_train["train"], decode_on_device=True, **kwargs)
    assert encoded.decode_on_device and not decoded.decode_on_device
    encoded.device_augment.decoder = cv2_decoder
    indices = [(i, 7 * i) for i in range(8)]
    sample = encoded[indices[5]]
    assert sample["img"].numel() == 0 and sample["jpeg"].dtype == torch.uint8 and sample["exif_orientation"] == 6
    assert sample["augment_seed"] == decoded[indices[5]]["augment_seed"]
    expected = decoded.device_augment.preprocess(collate_fn([decoded[i] for i in indices]), "cpu")
    got = encoded.device_augment.preprocess(collate_fn([encoded[i] for i in indices]), "cpu")
    assert torch.equal(got["batch_idx"], expected["batch_idx"]) and torch.equal(got["cls"], expected["cls"])
    torch.testing.assert_close(got["bboxes"], expected["bboxes"], atol=1e-5, rtol=0)
    difference = (got["img"] - expected["img"]).abs() * 255
    if imgsz == 128:
        assert float(difference.max()) < 1e-3
    else:  # OpenCV's and torch's bilinear 2x downscales round differently
        assert float(difference.mean()) < 0.5


def test_decoding_stays_in_the_workers_with_an_image_cache(shapes_train):
    dataset = DeviceAugmentDataset(shapes_train["train"], imgsz=64, augment=True, data=shapes_train, workers=0,
                                   cache="ram", decode_on_device=True)
    assert not dataset.decode_on_device and dataset[(0, 0)]["img"].shape == (3, 64, 64)
    assert jpeg_decoder_for("cpu") is False


def test_choice_of_the_path():
    args = make_hyp(rect=False, copy_paste=0.0)
    for choice, device, expected in [("cpu", "cuda", False), ("auto", "cpu", False), ("auto", "cuda", True),
                                     ("device", "cpu", True)]:
        args.augment_device = choice
        assert check_device_augment(args, torch.device(device)) is expected
    args.rect = True
    args.augment_device = "auto"
    assert check_device_augment(args, torch.device("cuda")) is False  # falls back, with a log line
    args.augment_device = "device"
    with pytest.raises(CfgError, match="rect=True"):
        check_device_augment(args, torch.device("cpu"))
    args.rect = False
    with pytest.raises(CfgError, match="augment="):
        check_device_augment(args, torch.device("cpu"), augment_hook=True)


def test_bad_augment_device_is_a_one_line_error(tmp_path):
    with pytest.raises(CfgError, match="augment_device"):
        DetectionTrainer(overrides=dict(augment_device="gpu", project=str(tmp_path)))


def test_one_epoch_trains_with_the_device_path_on_cpu(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "augment_device": "device", "mixup": 0.5,
                                          "degrees": 5.0})
    shapes = []
    trainer.add_callback("on_train_batch_end", lambda t: shapes.append(t.last_batch_shape))
    metrics = trainer.train()
    assert isinstance(trainer.train_loader.dataset, DeviceAugmentDataset)
    assert trainer.resolved.augment_on_device is True
    assert shapes and all(shape[1:] == (3, 64, 64) for shape in shapes)
    assert np.isfinite(trainer.tloss.cpu().numpy()).all()
    assert "metrics/mAP50-95(B)" in metrics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares against CUDA, which this machine lacks")
def test_cuda_gives_the_cpu_batch():
    dataset = FakeDataset()
    hyp = make_hyp(mosaic=0.7, mixup=0.3, degrees=5.0, shear=2.0, perspective=0.0005, hsv_h=0.015, hsv_s=0.7,
                   hsv_v=0.4, flipud=0.2)
    on_cpu = DeviceAugment(IMGSZ, hyp).preprocess(device_batch(dataset, seed=4), "cpu")
    on_cuda = DeviceAugment(IMGSZ, hyp).preprocess(device_batch(dataset, seed=4), "cuda")
    assert torch.equal(on_cuda["batch_idx"].cpu(), on_cpu["batch_idx"]) and on_cuda["max_boxes"] == on_cpu["max_boxes"]
    torch.testing.assert_close(on_cuda["bboxes"].cpu(), on_cpu["bboxes"], atol=1e-4, rtol=0)
    assert float((on_cuda["img"].cpu() - on_cpu["img"]).abs().mean()) < 1e-3
