"""image_weights=True: images drawn by the classes they hold and the last validation's per-class mAP, as a pure
function of (seed, epoch, weights), each rank taking its share of one global draw, and resumed exactly."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from yolotrain import DetectionTrainer
from yolotrain.data.loader import build_dataloader, set_loader_epoch
from yolotrain.data.samplers import ClassMapsFeed, ImageWeightSampler, image_class_counts, image_weights
from yolotrain.utils.checkpoint import load_checkpoint
from yolotrain.utils.metrics import DetMetrics


class LabelledDataset(torch.utils.data.Dataset):
    """`classes[i]` is the list of box classes of image i; samples are the index and the seed they got."""

    def __init__(self, classes, nc):
        self.labels = [{"cls": np.array(c, np.float32).reshape(-1, 1)} for c in classes]
        self.nc = nc
        self.rect = False

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, seed = item
        return {"img": torch.zeros(3, 2, 2, dtype=torch.uint8), "cls": torch.zeros(0, 1),
                "bboxes": torch.zeros(0, 4), "index": index, "seed": seed}


def drawn(sampler, epoch):
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler]


def test_image_class_counts_and_weights():
    counts = image_class_counts([{"cls": np.array([[0], [2], [2]])}, {"cls": np.zeros((0, 1))}], nc=3)
    assert counts.tolist() == [[1, 0, 2], [0, 0, 0]]
    # class 0: 1 box, class 1: 1 box, class 2: 2 boxes
    counts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 2], [0, 0, 0]])
    weights = image_weights(counts, np.zeros(3))
    np.testing.assert_allclose(weights, np.array([1, 1, 1, 1]) / 4)  # 2 boxes of class 2 at 1/2 each; background
    weights = image_weights(counts, np.array([0.5, 0.0, 0.0]))  # (1 - 0.5)^2 = 0.25
    np.testing.assert_allclose(weights, np.array([0.25, 1, 1, 0.25]) / 2.5)
    np.testing.assert_allclose(image_weights(counts, np.ones(3)), np.full(4, 0.25))  # nothing left: uniform


def test_images_of_a_low_map_class_are_drawn_more_often():
    dataset = LabelledDataset([[0]] * 10 + [[1]] * 10, nc=2)
    sampler = ImageWeightSampler(dataset, seed=0)
    before = np.mean([i >= 10 for epoch in range(5) for i in drawn(sampler, epoch)])
    assert 0.35 < before < 0.65  # equal frequencies, no mAP yet: about half each
    sampler.set_class_maps([0.9, 0.2])
    after = np.mean([i >= 10 for epoch in range(5) for i in drawn(sampler, epoch)])
    assert after > 0.9  # (1 - 0.2)^2 = 0.64 against (1 - 0.9)^2 = 0.01

    rare = ImageWeightSampler(LabelledDataset([[0]] * 18 + [[1]] * 2, nc=2), seed=0)
    share = np.mean([i >= 18 for epoch in range(5) for i in drawn(rare, epoch)])
    assert 0.35 < share < 0.65  # 10% of the images, half of the draws: rare classes are seen as often


def test_draw_is_a_pure_function_of_seed_epoch_and_weights():
    dataset = LabelledDataset([[c % 3] for c in range(30)], nc=3)
    a, b = ImageWeightSampler(dataset, seed=4), ImageWeightSampler(dataset, seed=4)
    assert drawn(a, 2) == drawn(b, 2) == drawn(a, 2)
    assert drawn(a, 2) != drawn(a, 3) and drawn(a, 2) != drawn(ImageWeightSampler(dataset, seed=5), 2)
    b.set_class_maps([0.1, 0.5, 0.9])
    assert drawn(a, 2) != drawn(b, 2)
    a.set_class_maps([0.1, 0.5, 0.9])
    assert drawn(a, 2) == drawn(b, 2)
    assert len(drawn(a, 2)) == len(a) == 30


def test_rank_shards_partition_the_global_draw():
    dataset = LabelledDataset([[c % 4] for c in range(21)], nc=4)
    single = ImageWeightSampler(dataset, seed=7)
    ranks = [ImageWeightSampler(dataset, num_replicas=3, rank=r, seed=7) for r in range(3)]
    for sampler in [single, *ranks]:
        sampler.set_class_maps([0.2, 0.4, 0.6, 0.8])
        sampler.set_epoch(1)
    draw = single.global_draw()
    shards = [list(sampler) for sampler in ranks]
    assert all(len(s) == 7 for s in shards)
    for rank, pairs in enumerate(shards):
        assert [index for index, _ in pairs] == draw[rank::3]
    seeds = [seed for pairs in shards for _, seed in pairs]
    assert len(set(seeds)) == 21  # seeded by draw position: an image drawn twice is augmented twice differently
    assert sorted(seeds) == sorted(seed for _, seed in single)  # the same seeds whatever the number of ranks


def test_loader_with_image_weights_resumes_mid_epoch():
    dataset = LabelledDataset([[c % 3] for c in range(12)], nc=3)
    loader = build_dataloader(dataset, batch=4, workers=0, shuffle=True, seed=3, image_weights=True)
    assert isinstance(loader.sampler, ImageWeightSampler)
    loader.sampler.set_class_maps([0.0, 0.5, 1.0])
    set_loader_epoch(loader, 2)
    full = [(b["index"], b["seed"]) for b in loader]
    set_loader_epoch(loader, 2, start_batch=1)
    assert [(b["index"], b["seed"]) for b in loader] == full[1:]


def test_class_maps_feed_hands_rank_zeros_maps_over_and_keeps_them_as_state():
    dataset = LabelledDataset([[0], [1], [2]], nc=3)
    sampler = ImageWeightSampler(dataset)
    feed = ClassMapsFeed(sampler)
    feed.on_val_end(SimpleNamespace(training=False, metrics=SimpleNamespace(maps=np.ones(3))))  # final eval
    assert feed.pending is None
    feed.on_val_end(SimpleNamespace(training=True, metrics=SimpleNamespace(maps=np.array([0.1, 0.2, 0.3]))))
    assert feed.state_dict() == {"class_maps": [0.1, 0.2, 0.3]}  # a checkpoint saved now holds the new maps
    assert sampler.class_maps.tolist() == [0, 0, 0]  # the current epoch's draw is untouched until the epoch ends
    feed.on_fit_epoch_end(SimpleNamespace(metrics={"fitness": 0.0}))
    np.testing.assert_allclose(sampler.class_maps, [0.1, 0.2, 0.3])
    other = ClassMapsFeed(ImageWeightSampler(dataset))
    other.load_state_dict(feed.state_dict())
    np.testing.assert_allclose(other.sampler.class_maps, [0.1, 0.2, 0.3])


class Crash(Exception):
    pass


@pytest.fixture
def scripted_maps(monkeypatch):
    """Validations report per-class mAPs set by the epoch (a tiny model's would all be 0 after a few epochs);
    returns the callback that tells them the epoch."""
    epoch = {"now": 0}
    pattern = [np.array([0.1, 0.5, 0.9]), np.array([0.9, 0.1, 0.5]), np.array([0.5, 0.9, 0.1])]
    monkeypatch.setattr(DetMetrics, "maps", property(lambda self: pattern[epoch["now"] % 3].copy()))

    def set_epoch(trainer):
        epoch["now"] = trainer.epoch

    return set_epoch


def record_draws(draws):
    def record(trainer):  # the sampler's epoch is set by now: this is the draw the epoch reads
        draws[trainer.epoch] = trainer.train_loader.sampler.global_draw()
    return record


def test_trainer_feeds_validation_maps_to_the_sampler_and_resume_draws_the_same(train_overrides, scripted_maps):
    overrides = {**train_overrides, "image_weights": True, "epochs": 3, "batch": 2}
    straight_draws, maps_seen = {}, []
    straight = DetectionTrainer(overrides={**overrides, "name": "straight"})
    straight.add_callback("on_train_epoch_start", scripted_maps)
    straight.add_callback("on_train_epoch_start", record_draws(straight_draws))
    straight.add_callback("on_val_end", lambda v: maps_seen.append(v.metrics.maps.tolist()) if v.training else 0)
    straight.train()
    assert len(maps_seen) == 3
    np.testing.assert_allclose(straight.train_loader.sampler.class_maps, maps_seen[2])  # the last validation's
    assert straight_draws[1] != straight_draws[2]

    def crash(trainer):
        if trainer.epoch == 1:
            raise Crash

    crashed = DetectionTrainer(overrides={**overrides, "name": "crashed"})
    crashed.add_callback("on_train_epoch_start", scripted_maps)
    crashed.add_callback("on_fit_epoch_end", crash)
    with pytest.raises(Crash):
        crashed.train()
    checkpoint = load_checkpoint(crashed.last)
    assert checkpoint["epoch"] == 1
    np.testing.assert_allclose(checkpoint["callbacks"]["image_weights"]["class_maps"], maps_seen[1])

    resumed_draws = {}
    resumed = DetectionTrainer(overrides={"resume": str(crashed.last)})
    resumed.add_callback("on_train_epoch_start", scripted_maps)
    resumed.add_callback("on_train_epoch_start", record_draws(resumed_draws))
    resumed.train()
    assert list(resumed_draws) == [2] and resumed_draws[2] == straight_draws[2]
