"""Shared training utilities: config loading, step-addressed batches, atomic safetensors checkpoints."""

import json
import logging
import math
import warnings

import pytest
import torch
from diffusers.training_utils import EMAModel

from latentlm.config import OptimizerConfig, load_config
from latentlm.files import atomic_directory
from latentlm.training.batching import batch_indices, class_balanced_order, seed_step
from latentlm.training.checkpoints import CheckpointManager, CheckpointMismatchError
from latentlm.training.loop import NonFiniteLossError, check_finite
from latentlm.training.optimization import make_lr_scheduler, make_optimizer


def test_config_coerces_yaml_scalars_and_applies_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("autoencoder:\n  optimizer:\n    learning_rate: 3e-4\n  model:\n    max_length: 32\n")
    config = load_config(path, ["diffusion.optimizer.max_steps=7", "data.label_column=sentiment"])
    assert config.autoencoder.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.autoencoder.optimizer.batch_size == 256  # untouched defaults survive a partial section
    assert config.diffusion.optimizer.max_steps == 7
    assert config.diffusion.optimizer.lr_schedule == "cosine"
    assert config.data.label_column == "sentiment"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"autoencoder": {"optimiser": {}}}, "Unknown config key 'autoencoder.optimiser'"),
        ({"autoencoder": {"model": {"max_length": "long"}}}, "autoencoder.model.max_length must be a number"),
        ({"autoencoder": {"mixed_precision": "fp8"}}, "mixed_precision"),
        ({"diffusion": {"optimizer": {"batch_size": 0}}}, "batch_size must be positive"),
        ({"diffusion": {"label_dropout_prob": 1.5}}, "label_dropout_prob"),
        ({"autoencoder": {"model": {"context_positions": -2}}}, "context_positions"),
        ({"decoder_tuning": {"latent_noise_std": -1}}, "decoder_tuning.latent_noise_std must be >= 0"),
        ({"decoder_tuning": {"optimizer": {"max_steps": 0}}}, "decoder_tuning.optimizer.max_steps must be positive"),
        ({"autoencoder": {"model": {"head_dim": 0}}}, "autoencoder.model.head_dim must be a positive integer, got 0"),
        ({"autoencoder": {"model": {"causal": {"memory": "prefix"}}}}, "autoencoder.model.causal.memory='prefix'"),
        ({"autoencoder": {"model": {"lora": {"rank": 4}}}}, "Unknown config key 'autoencoder.model.lora.rank'"),
        ({"autoencoder": {"log_every": 0}}, r"autoencoder.log_every must be >= 1 \(steps between logged losses\)"),
        ({"diffusion": {"save_every": 0}}, r"diffusion.save_every must be >= 1 .*cannot resume\), got 0"),
        ({"diffusion": {"ema_decay": 2}}, r"diffusion.ema_decay must lie in \[0, 1\)"),
        ({"autoencoder": {"eval_every": -1}}, "autoencoder.eval_every must be >= 0"),
        ({"classifier": {"optimizer": {"max_grad_norm": -1}}}, "classifier.optimizer.max_grad_norm must be >= 0"),
        (
            {"autoencoder": {"model": {"num_latents": 8, "tokens_per_query": 4, "max_length": 64}}},
            "8 x 4 = 32 token positions, fewer than max_length=64",
        ),
        ({"decoder_tuning": {"latent_source": "clean"}}, "decoder_tuning.latent_source='clean'"),
        ({"autoencoder": {"kl_weight": 0.01}}, "autoencoder.kl_weight=0.01 penalises a variational posterior"),
        ({"autoencoder": {"kl_weight": -1}}, "autoencoder.kl_weight must be >= 0"),
        (
            {"autoencoder": {"model": {"variational": True}, "latent_noise_std": 0.5}},
            "autoencoder.latent_noise_std=0.5 would add fixed noise to the samples of the variational posterior",
        ),
    ],
)
def test_config_rejects_bad_values_with_the_key_named(raw, message):
    with pytest.raises(ValueError, match=message):
        load_config(raw)


def test_flat_model_keys_of_earlier_releases_load_with_a_warning_that_shows_the_new_form():
    flat = {"autoencoder": {"backbone": "smollm2", "num_latents": 16, "lora_r": 8, "causal_memory": "key_value_prefix"}}
    with pytest.warns(FutureWarning, match=r"(?s)autoencoder.backbone, .*under autoencoder.model.*lora:\n\s+r: 8"):
        config = load_config(flat, ["autoencoder.latent_dim=32"])
    model = config.autoencoder.model
    assert (model.backbone, model.num_latents, model.latent_dim) == ("smollm2", 16, 32)
    assert (model.lora.r, model.lora.alpha, model.causal.memory) == (8, 32, "key_value_prefix")
    nested = {
        "autoencoder": {
            "model": {
                "backbone": "smollm2",
                "num_latents": 16,
                "latent_dim": 32,
                "lora": {"r": 8},
                "causal": {"memory": "key_value_prefix"},
            }
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(nested) == config
        # a flat --set on a nested file still overrides, as before
    with pytest.warns(FutureWarning):
        assert load_config(nested, ["autoencoder.num_latents=4"]).autoencoder.model.num_latents == 4


def test_batches_are_addressed_by_step_and_cover_each_epoch():
    first_epoch = [i for step in range(5) for i in batch_indices(10, 2, step, seed=3)]
    assert sorted(first_epoch) == list(range(10))
    assert batch_indices(10, 2, 4, seed=3) == batch_indices(10, 2, 4, seed=3)
    assert first_epoch != [i for step in range(5, 10) for i in batch_indices(10, 2, step, seed=3)]
    # two processes split the same global batch that one process would see
    single = batch_indices(10, 4, 7, seed=1)
    split = batch_indices(10, 4, 7, seed=1, process_index=0, num_processes=2) + batch_indices(
        10, 4, 7, seed=1, process_index=1, num_processes=2
    )
    assert single == split
    assert len(batch_indices(3, 8, 0, seed=0)) == 8  # a batch larger than the data wraps into the next epoch
    with pytest.raises(ValueError, match="empty"):
        batch_indices(0, 2, 0, seed=0)
    with pytest.raises(ValueError, match="split evenly"):
        batch_indices(10, 3, 0, seed=0, num_processes=2)


def test_length_grouped_batches_cover_each_epoch_with_similar_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(1, 65, (1000,), generator=generator).tolist())
    batch = 10
    epoch = [batch_indices(1000, batch, step, seed=2, lengths=lengths) for step in range(100)]
    assert sorted(i for b in epoch for i in b) == list(range(1000))  # still every example once per epoch

    def mean_spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    random_batches = [batch_indices(1000, batch, step, seed=2) for step in range(100)]
    assert mean_spread(epoch) < 0.25 * mean_spread(random_batches)
    # not sorted across the epoch: batch order is shuffled, so long and short batches alternate
    first_lengths = [lengths[b[0]] for b in epoch[:20]]
    assert first_lengths != sorted(first_lengths, reverse=True)
    # resume and multi-process sharding see the same global batch
    assert batch_indices(1000, batch, 57, seed=2, lengths=lengths) == epoch[57]
    split = batch_indices(1000, batch, 57, seed=2, process_index=0, num_processes=2, lengths=lengths) + (
        batch_indices(1000, batch, 57, seed=2, process_index=1, num_processes=2, lengths=lengths)
    )
    assert split == epoch[57]
    with pytest.raises(ValueError, match="one per example"):
        batch_indices(1000, batch, 0, seed=2, lengths=lengths[:10])


def test_class_balanced_order_repeats_smaller_classes_to_the_largest():
    labels = [0] * 10 + [1] * 4 + [2] * 3
    order = class_balanced_order(labels, seed=5)
    counts = torch.bincount(torch.tensor([labels[i] for i in order]))
    assert counts.tolist() == [10, 10, 10]
    assert set(order) == set(range(len(labels)))  # nobody dropped
    # class 1 (4 examples, 10 draws): every example twice, two of them a third time
    assert sorted(torch.bincount(torch.tensor([i for i in order if labels[i] == 1])).tolist()[10:14]) == [2, 2, 3, 3]
    assert class_balanced_order(labels, seed=5) == order  # a function of the seed: resuming draws the same
    assert class_balanced_order(labels, seed=6) != order
    with pytest.raises(ValueError, match="non-empty"):
        class_balanced_order([], seed=0)


def test_seed_step_makes_random_draws_a_function_of_the_step():
    seed_step(0, 5)
    a = torch.randn(3)
    seed_step(0, 6)
    b = torch.randn(3)
    seed_step(0, 5)
    assert torch.equal(a, torch.randn(3)) and not torch.equal(a, b)


def test_check_finite_names_the_step():
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(NonFiniteLossError, match="at step 12"):
        check_finite(torch.tensor(float("nan")), 12)
    # a window of steps 20.. is checked at once; the error names the first bad one
    check_finite(torch.tensor([1.0, 2.0, 3.0]), 20)
    with pytest.raises(NonFiniteLossError, match=r"became inf at step 21\."):
        check_finite(torch.tensor([1.0, float("inf"), float("nan")]), 20)


def _train(model, optimizer, scheduler, ema, steps, start=0):
    for step in range(start, steps):
        seed_step(0, step)
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are not part of a checkpoint
    cfg = OptimizerConfig(learning_rate=1e-2, max_steps=10, warmup_steps=2)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    return model, optimizer, make_lr_scheduler(optimizer, cfg), EMAModel(model.parameters(), decay=0.9)


def test_checkpoint_resume_continues_exactly(tmp_path):
    model, optimizer, scheduler, ema = _setup()
    _train(model, optimizer, scheduler, ema, 10)

    model2, optimizer2, scheduler2, ema2 = _setup()
    _train(model2, optimizer2, scheduler2, ema2, 4)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 3, 4):
        manager.save(step, {"model": model2}, optimizer2, scheduler2, ema=ema2, extra_state={"note": "x"})
    assert [p.name for p in manager.checkpoints()] == ["step_00000003", "step_00000004"]
    assert not list(tmp_path.glob("checkpoints/.tmp-*"))
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    model3, optimizer3, scheduler3, ema3 = _setup()
    state = manager.load(manager.latest(), {"model": model3}, optimizer3, scheduler3, ema=ema3)
    assert state == {"step": 4, "extra_state": {"note": "x"}}
    _train(model3, optimizer3, scheduler3, ema3, 10, start=4)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.shadow_params, ema3.shadow_params):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == scheduler3.get_last_lr()


def test_a_checkpoint_resumed_under_another_schedule_steps_at_that_schedules_rate(tmp_path):
    model, optimizer, scheduler, ema = _setup()  # linear decay to zero at step 10
    _train(model, optimizer, scheduler, ema, 6)
    path = CheckpointManager(tmp_path).save(6, {"model": model}, optimizer, scheduler, ema=ema)
    longer = OptimizerConfig(learning_rate=1e-2, max_steps=20, warmup_steps=2, lr_schedule="cosine")
    model2, _, _, ema2 = _setup()
    optimizer2 = make_optimizer([p for p in model2.parameters() if p.requires_grad], longer)
    scheduler2 = make_lr_scheduler(optimizer2, longer)
    CheckpointManager(tmp_path).load(path, {"model": model2}, optimizer2, scheduler2, ema=ema2)
    # step 7 runs at the cosine rate of step 6 of 20, not the linear one the checkpoint saved
    expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * 4 / 18))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 4 / 8)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(expected)


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    model, optimizer, scheduler, _ = _setup()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"model": model}, optimizer, scheduler)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 2))
    wider[0].bias.requires_grad_(False)
    opt = make_optimizer(wider.parameters(), OptimizerConfig())
    with pytest.raises(CheckpointMismatchError, match=r"0.weight has shape \(5, 3\)"):
        manager.load(path, {"model": wider}, opt, make_lr_scheduler(opt, OptimizerConfig()))


def test_atomic_directory_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.json").write_text(json.dumps({"v": 1}))
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.json").write_text(json.dumps({"v": 2}))
            raise RuntimeError("killed")
    assert json.loads((target / "a.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_yaml_bare_no_reads_as_the_string_no(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("autoencoder:\n  mixed_precision: no\n")
    assert load_config(path).autoencoder.mixed_precision == "no"


def test_two_stages_in_one_process_may_use_different_mixed_precision():
    from latentlm.training.loop import make_accelerator

    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


@pytest.mark.parametrize("native", [True, False])
def test_auto_mixed_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch, native):
    from latentlm.training import precision as training

    monkeypatch.setattr(training, "has_native_bf16", lambda device: native)
    assert training.resolve_mixed_precision("auto", "cpu") == ("bf16" if native else "no")
    assert training.make_accelerator("auto").mixed_precision == ("bf16" if native else "no")
    assert training.resolve_mixed_precision("no", "cpu") == "no"


def test_bf16_without_native_support_warns_and_names_the_fix(monkeypatch, caplog):
    from latentlm.training import precision as training

    monkeypatch.setattr(training, "has_native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="latentlm.training.precision"):
        assert training.resolve_mixed_precision("bf16", "cpu") == "bf16"  # kept: the user asked for it
    assert "without native bfloat16" in caplog.text and "'auto'" in caplog.text
    caplog.clear()
    monkeypatch.setattr(training, "has_native_bf16", lambda device: True)
    with caplog.at_level(logging.WARNING, logger="latentlm.training.precision"):
        assert training.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert not caplog.text
    with pytest.raises(ValueError, match="fp16' needs a GPU"):
        training.resolve_mixed_precision("fp16", "cpu")


def test_has_native_bf16_reads_the_cpu_features(monkeypatch, tmp_path):
    from latentlm import hardware as training

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    for flag in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda flag=flag: flag, raising=False)
        monkeypatch.setattr(training.platform, "machine", lambda: "x86_64")
        assert training.has_native_bf16("cpu") is flag
    # Arm: the BF16 extension as Linux lists it
    monkeypatch.setattr(training.platform, "machine", lambda: "aarch64")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(training, "CPUINFO", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert training.has_native_bf16("cpu")
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve i8mm\n")
    assert not training.has_native_bf16("cpu")
    cpuinfo.unlink()
    assert not training.has_native_bf16("cpu")
    assert not training.has_native_bf16("meta")


def test_config_accepts_auto_mixed_precision_and_names_the_choices(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("diffusion:\n  mixed_precision: auto\n")
    assert load_config(path).diffusion.mixed_precision == "auto"
    path.write_text("diffusion:\n  mixed_precision: bfloat16\n")
    with pytest.raises(ValueError, match=r"diffusion.mixed_precision='bfloat16': use one of .*'auto'"):
        load_config(path)
