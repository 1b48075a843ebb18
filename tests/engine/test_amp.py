"""Mixed precision on CPU (bf16 autocast and its fallback), channels-last training, compile of the forward only."""

import logging

import pytest
import torch

from yolotrain.cfg import get_cfg
from yolotrain.engine import amp
from yolotrain.engine.optim import OptimizerStepper
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.train import DetectionTrainer

OVERFIT_STEPS = 6
# bf16 keeps 8 significant bits: along a short path the loss of the same weights stays close to fp32's. Largest gap
# over the 6 steps, measured with oneDNN on AMX 0.030, capped to AVX512_CORE_BF16 or AVX512_CORE 0.042, capped to
# AVX2 (bf16 emulated) 0.028: twice the worst, while a broken bf16 kernel is off by far more.
MAX_RELATIVE_LOSS_GAP = 0.08


def train(overrides, **extra):
    trainer = DetectionTrainer(overrides={**overrides, **extra})
    trainer.train()
    return trainer


def fixed_batch(batch_size=2, imgsz=64):
    """Two bright squares on dim noise per image, with their boxes (normalised xywh) as the collate function
    builds them."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, imgsz, imgsz, generator=generator) * 0.3
    images[:, 0, 13:32, 10:29] = 1.0
    images[:, 1, 29:48, 35:54] = 1.0
    return {
        "img": images,
        "cls": torch.tensor([[0.0], [1.0]]).repeat(batch_size, 1),
        "bboxes": torch.tensor([[0.3, 0.35, 0.3, 0.3], [0.7, 0.6, 0.3, 0.3]]).repeat(batch_size, 1),
        "batch_idx": torch.arange(batch_size).repeat_interleave(2).float(),
    }


def tiny_model(model_yaml):
    torch.manual_seed(0)
    model = DetectionModel(model_yaml, nc=2, verbose=False).train()
    model.args = get_cfg()
    return model


# ------------------------------------------------------------------------------------------------ bf16 on CPU
@pytest.mark.numeric
def test_bf16_training_on_cpu_has_finite_losses_close_to_fp32_along_its_path(tiny_model_yaml):
    """A few optimizer steps in bf16 on a fixed batch: each step's bf16 loss is close to the fp32 loss of the same
    weights, and the weights stay fp32."""
    model, batch = tiny_model(tiny_model_yaml), fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    stepper = OptimizerStepper(optimizer, torch.bfloat16, "cpu", max_norm=10.0)
    bf16, fp32 = [], []
    for step in range(OVERFIT_STEPS):
        with torch.no_grad():
            fp32.append(model.loss(batch, model(batch["img"]))[0].item())
        with stepper.autocast():
            loss, _ = model.loss(batch, model(batch["img"]))
        stepper.backward(loss)
        stepper.step_if_due(model, None, accumulate=1, step=step)
        bf16.append(loss.item())
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert len(set(bf16)) == OVERFIT_STEPS  # the weights moved every step
    gaps = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(gaps) < MAX_RELATIVE_LOSS_GAP, gaps
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast leaves the weights in fp32


def test_a_bf16_training_run_keeps_weights_ema_and_checkpoint_in_fp32(train_overrides, monkeypatch):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    trainer = train(train_overrides, epochs=1, amp=True)
    assert trainer.amp_dtype is torch.bfloat16 and trainer.resolved.amp == "bfloat16"
    assert not trainer.stepper.scaler.is_enabled()  # bf16 needs no loss scaling
    assert torch.isfinite(trainer.tloss).all()
    assert {p.dtype for p in trainer.ema.module.parameters()} == {torch.float32}
    saved = torch.load(trainer.last, map_location="cpu", weights_only=False)
    assert {v.dtype for v in saved["ema"].values() if v.is_floating_point()} == {torch.float32}
    assert trainer.metrics is not None  # validation of the fp32 EMA ran


def test_the_cpu_probe_accepts_a_working_bf16_autocast():
    assert amp.cpu_bf16_probe()


def test_the_cpu_probe_refuses_an_autocast_that_gives_wrong_results(monkeypatch):
    real_probe_ops = amp._probe_ops

    def broken(image, weight, matrix):
        out = real_probe_ops(image, weight, matrix)
        return out * 2 if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(amp, "_probe_ops", broken)
    assert not amp.cpu_bf16_probe()


def test_amp_falls_back_to_fp32_with_one_line_when_the_probe_fails(train_overrides, monkeypatch, yolotrain_log):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(amp, "cpu_bf16_probe", lambda: False)
    trainer = train(train_overrides, epochs=1, val=False, amp=True)
    lines = [m for m in yolotrain_log if m.startswith("amp")]
    assert len(lines) == 1 and "training in fp32" in lines[0]
    assert trainer.amp_dtype is None and trainer.resolved.amp == "off"
    with trainer.stepper.autocast():
        assert trainer.model(torch.rand(1, 3, 64, 64))[0].dtype == torch.float32
    assert torch.isfinite(trainer.tloss).all()


def test_amp_on_a_cpu_without_native_bf16_trains_fp32_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="yolotrain"):
        assert amp.resolve_amp(True, torch.device("cpu")) is None
    assert [r.message for r in caplog.records] == [
        "amp: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in fp32"
    ]


def test_amp_bf16_requested_on_an_emulating_cpu_is_honoured_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="yolotrain"):
        assert amp.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert len(caplog.records) == 1 and "emulates bfloat16" in caplog.records[0].message


def test_amp_false_is_fp32_everywhere():
    assert amp.resolve_amp(False, torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------------ channels_last
@pytest.mark.numeric
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_model_and_batch_give_the_contiguous_output(tiny_model_yaml, training):
    torch.manual_seed(0)
    model = DetectionModel(tiny_model_yaml, nc=2, verbose=False).train(training)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(images)
        model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last))
    maps_expected = expected if training else expected[1]
    maps_got = got if training else got[1]
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(maps_expected, maps_got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    if not training:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)  # decoded boxes and scores


@pytest.mark.parametrize("setting", [True, False])
def test_channels_last_argument_sets_the_layout_of_the_model_and_batches(train_overrides, setting):
    seen = []
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False, "channels_last": setting})
    trainer.add_callback("on_train_start", lambda t: _record_forward_inputs(t, seen))
    trainer.train()
    weight = trainer.model.model[0].conv.weight
    assert trainer.channels_last is setting and trainer.resolved.channels_last is setting
    assert weight.is_contiguous(memory_format=torch.channels_last) is setting
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) is setting for x in seen)
    assert torch.isfinite(trainer.tloss).all()


def _record_forward_inputs(trainer, seen):
    handle_owner = trainer.model.model[0]
    handle_owner.register_forward_pre_hook(lambda module, args: seen.append(args[0]) if module.training else None)


def test_channels_last_auto_follows_the_device():
    from yolotrain.utils.torch_utils import channels_last_pays

    cpu = torch.device("cpu")
    assert amp.resolve_channels_last(None, cpu) is channels_last_pays(cpu)
    assert amp.resolve_channels_last(False, cpu) is False and amp.resolve_channels_last(True, cpu) is True


# ------------------------------------------------------------------------------------------------ compile
def test_compile_wraps_the_network_and_the_loss_runs_outside_it(train_overrides, monkeypatch):
    inputs = []

    class RecordingCompile(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            inputs.append(x)
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: RecordingCompile(model))
    trainer = train(train_overrides, epochs=1, val=False, compile=True)
    assert inputs and all(isinstance(x, torch.Tensor) and x.ndim == 4 for x in inputs)  # images, never a batch dict
    assert torch.isfinite(trainer.tloss).all()


@pytest.mark.slow
def test_compiled_graphs_hold_the_network_only(train_overrides, monkeypatch):
    """A real torch.compile (dynamo, with a backend that records its graphs and runs them eagerly): no graph holds
    the loss (BCE) or the assigner (top-k over anchors)."""
    graphs = []
    real_compile = torch.compile

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: real_compile(model, backend=record))
    trainer = train(train_overrides, epochs=1, val=False, compile=True, batch=8, fraction=8)
    code = "\n".join(graph.code for graph in graphs)
    assert graphs and "conv2d" in code
    assert "binary_cross_entropy" not in code and "topk" not in code
    assert torch.isfinite(trainer.tloss).all()
