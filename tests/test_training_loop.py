"""The shared training loop (`latentlm.training.loop.run_stage`): a new stage is a small class, and the loop
gives it resume, checkpoints, cadence, a time budget and the history file."""

import dataclasses
import inspect
import json

import pytest
import torch
from latentlm.autoencoder.model_settings import backbone_arguments
from latentlm.autoencoder.text_autoencoder import TextAutoencoder
from safetensors.torch import load_file

import latentlm.training.loop as training_loop
from latentlm.config import AutoencoderTrainingConfig, TrainingLoopConfig, load_config
from latentlm.training.loop import TrainingStage, run_stage
from latentlm.training.optimization import make_lr_scheduler, make_optimizer


class RegressionStage(TrainingStage):
    """y = x @ w on fixed random data: the smallest stage there is."""

    name = "regression"
    final_dir, checkpoint_dir, history_file = "regression", "regression_training", "regression_history.json"

    def setup(self, accelerator):
        data = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=data)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.model = torch.nn.Linear(4, 1, bias=False)
        self.optimizer = make_optimizer(self.model.parameters(), self.cfg.optimizer)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, self.cfg.optimizer)
        self.train_model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.modules = {"model": self.model}
        self.evaluations = 0

    def training_step(self, step, generator):
        rows = self.batch_indices(step, len(self.x))
        noise = 0.01 * torch.randn(len(rows), generator=generator)  # per-step randomness, reproducible
        return torch.nn.functional.mse_loss(self.train_model(self.x[rows]).squeeze(-1), self.y[rows] + noise)

    @property
    def eval_every(self):
        return 5

    def evaluate(self, step, tracker):
        self.evaluations += 1
        with torch.no_grad():
            return {"mse": float(torch.nn.functional.mse_loss(self.model(self.x).squeeze(-1), self.y))}

    def save(self, folder):
        from safetensors.torch import save_file

        save_file(self.model.state_dict(), str(folder / "model.safetensors"))


class KilledAt(Exception):
    pass


class Recorder:
    """A tracker that records metrics and can kill the run after a step."""

    def __init__(self, kill_step=None):
        self.kill_step, self.metrics = kill_step, []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))
        if step == self.kill_step:
            raise KilledAt(step)

    def log_params(self, params): ...
    def log_artifact(self, path, artifact_path=None): ...


def _stage(tmp_path, **loop):
    config = load_config({"output_dir": str(tmp_path / "run"), "tracking": {"enabled": False}})
    cfg = TrainingLoopConfig(**{"save_every": 4, "log_every": 1, **loop})
    cfg.optimizer.learning_rate, cfg.optimizer.batch_size, cfg.optimizer.max_steps = 0.05, 16, 20
    cfg.optimizer.warmup_steps = 0
    return RegressionStage(config, cfg)


def test_a_stage_trains_evaluates_and_writes_its_history(tmp_path):
    stage = _stage(tmp_path)
    recorder = Recorder()
    final = run_stage(stage, tracker=recorder)
    history = json.loads((tmp_path / "run" / "regression_history.json").read_text())
    assert final == tmp_path / "run" / "regression" and (final / "model.safetensors").is_file()
    assert history["final_step"] == 20
    assert [h["step"] for h in history["history"]] == [5, 10, 15, 20]  # every 5 steps, and once at the end
    assert history["history"][-1]["mse"] < history["history"][0]["mse"]
    assert [m["step"] for m in history["loss_curve"]] == list(range(1, 21))
    assert {"train/loss", "lr", "train/steps_per_s"} <= set(recorder.metrics[0][1])


def test_a_killed_stage_resumes_to_the_same_weights(tmp_path):
    run_stage(_stage(tmp_path / "a"), tracker=Recorder())
    with pytest.raises(KilledAt):
        run_stage(_stage(tmp_path / "b"), tracker=Recorder(kill_step=11))  # last checkpoint: step 8
    run_stage(_stage(tmp_path / "b"), tracker=Recorder(), resume=True)
    a = load_file(str(tmp_path / "a" / "run" / "regression" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "regression" / "model.safetensors"))
    torch.testing.assert_close(a["weight"], b["weight"], atol=0, rtol=0)
    history_a = json.loads((tmp_path / "a" / "run" / "regression_history.json").read_text())
    history_b = json.loads((tmp_path / "b" / "run" / "regression_history.json").read_text())
    assert [h["mse"] for h in history_a["history"]] == [h["mse"] for h in history_b["history"]]


def test_a_constant_rate_checkpoint_branches_into_a_warmup_stable_decay_run(tmp_path):
    """Warmup-stable-decay is the constant schedule until its decay: resuming a constant-rate run's
    checkpoint under it gives the same weights and rates as running it from the start."""

    def wsd(root):
        stage = _stage(root)
        stage.cfg.optimizer.lr_schedule, stage.cfg.optimizer.decay_steps = "warmup_stable_decay", 8
        return stage

    wsd_recorder = Recorder()
    run_stage(wsd(tmp_path / "a"), tracker=wsd_recorder)
    constant = _stage(tmp_path / "b")
    constant.cfg.optimizer.lr_schedule, constant.cfg.optimizer.max_steps = "constant", 12
    run_stage(constant, tracker=Recorder())  # a checkpoint at step 12, where the decay starts
    branch_recorder = Recorder()
    run_stage(wsd(tmp_path / "b"), tracker=branch_recorder, resume=True)

    a = load_file(str(tmp_path / "a" / "run" / "regression" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "regression" / "model.safetensors"))
    torch.testing.assert_close(a["weight"], b["weight"], atol=0, rtol=0)
    rates = {step: metrics["lr"] for step, metrics in wsd_recorder.metrics if "lr" in metrics}
    assert rates[12] == pytest.approx(0.05) and rates[16] == pytest.approx(0.025) and rates[20] == 0.0
    assert {s: m["lr"] for s, m in branch_recorder.metrics if "lr" in m} == {s: rates[s] for s in range(13, 21)}
    # the decay must fit after the warmup
    with pytest.raises(ValueError, match="decay_steps"):
        load_config(None, ["diffusion.optimizer.lr_schedule=warmup_stable_decay"])


def test_time_budget_stops_early_with_a_checkpoint_and_final_save(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 10))  # every perf_counter() call advances 10 s
    monkeypatch.setattr(training_loop.time, "perf_counter", lambda: next(clock))
    stage = _stage(tmp_path)
    run_stage(stage, tracker=Recorder(), time_budget_s=25)
    history = json.loads((tmp_path / "run" / "regression_history.json").read_text())
    assert history["final_step"] == 3
    assert (tmp_path / "run" / "regression_training" / "checkpoints" / "step_00000003").is_dir()
    assert [h["step"] for h in history["history"]] == [3]  # only the final evaluation
    assert history["time_budget_reached"] is True


def test_time_budget_from_the_config_and_train_counts_the_stage_as_done(tmp_path, monkeypatch):
    from latentlm.training.run import _stage_done

    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(training_loop.time, "perf_counter", lambda: next(clock))
    stage = _stage(tmp_path, time_budget_minutes=25 / 60)
    run_stage(stage, tracker=Recorder())
    history_file = tmp_path / "run" / "regression_history.json"
    assert json.loads(history_file.read_text())["final_step"] == 3
    # `latentlm train --resume` skips a stage that its budget ended, as one that reached max_steps
    assert _stage_done(history_file, tmp_path / "run" / "regression", max_steps=stage.cfg.optimizer.max_steps)
    # a budget must be positive
    with pytest.raises(ValueError, match="time_budget_minutes"):
        load_config(None, ["diffusion.time_budget_minutes=0"])


def test_budget_decay_end_gives_the_decay_its_share_of_the_time_budget():
    from latentlm.training.time_budget import budget_decay_end

    # 100 s for 20 steps, the last 8 (40 %) decaying: the decay gets the last 40 s of the budget
    assert budget_decay_end(5, 50.0, 10.0, 100.0, max_steps=20, decay_steps=8) is None  # 60 s of steps left
    assert budget_decay_end(6, 60.0, 10.0, 100.0, max_steps=20, decay_steps=8) == 10  # 40 s left: 4 steps
    assert budget_decay_end(6, 60.0, 2.0, 100.0, max_steps=20, decay_steps=8) is None  # 20 more steps fit
    assert budget_decay_end(12, 90.0, 10.0, 100.0, max_steps=20, decay_steps=8) is None  # its decay has begun
    assert budget_decay_end(6, 99.9, 10.0, 100.0, max_steps=20, decay_steps=8) == 7  # at least one step


def _fake_clock(monkeypatch, seconds_per_call=10):
    clock = iter(range(0, 1_000_000, seconds_per_call))  # every perf_counter() call advances 10 s: 10 s a step
    monkeypatch.setattr(training_loop.time, "perf_counter", lambda: next(clock))


def _budget_stage(root):
    stage = _stage(root)
    opt = stage.cfg.optimizer
    opt.max_steps, opt.lr_schedule, opt.decay_steps = 100, "warmup_stable_decay", 40
    return stage


def test_a_warmup_stable_decay_run_decays_to_zero_inside_its_time_budget(tmp_path, monkeypatch):
    # 100 steps of 10 s do not fit in 500 s: the decay (40 % of the steps) starts when 40 % of the
    # budget is left, at step 30, and the rate reaches zero at step 50, where the budget ends.
    _fake_clock(monkeypatch)
    recorder = Recorder()
    run_stage(_budget_stage(tmp_path), tracker=recorder, time_budget_s=500)
    rates = {step: metrics["lr"] for step, metrics in recorder.metrics if "lr" in metrics}
    assert rates[29] == rates[30] == pytest.approx(0.05)
    assert rates[40] == pytest.approx(0.025) and rates[50] == 0.0 and max(rates) == 50
    history = json.loads((tmp_path / "run" / "regression_history.json").read_text())
    assert history["final_step"] == 50 and history["budget_decay"] == [30, 50]
    assert history["time_budget_reached"] is True  # `latentlm train --resume` counts the stage as done

    # without a budget (or with one it fits in) the schedule is the configured one
    _fake_clock(monkeypatch)
    recorder = Recorder()
    run_stage(_budget_stage(tmp_path / "free"), tracker=recorder, time_budget_s=2_000)
    rates = {step: metrics["lr"] for step, metrics in recorder.metrics if "lr" in metrics}
    assert rates[60] == pytest.approx(0.05) and rates[80] == pytest.approx(0.025) and rates[100] == 0.0
    assert json.loads((tmp_path / "free" / "run" / "regression_history.json").read_text())["budget_decay"] is None


def test_a_decay_fitted_to_the_budget_resumes_exactly(tmp_path, monkeypatch):
    _fake_clock(monkeypatch)
    run_stage(_budget_stage(tmp_path / "a"), tracker=Recorder(), time_budget_s=500)
    _fake_clock(monkeypatch)
    with pytest.raises(KilledAt):  # last checkpoint: step 40, in the fitted decay
        run_stage(_budget_stage(tmp_path / "b"), tracker=Recorder(kill_step=42), time_budget_s=500)
    _fake_clock(monkeypatch, seconds_per_call=1)  # a faster machine on resume keeps the decided decay
    recorder = Recorder()
    run_stage(_budget_stage(tmp_path / "b"), tracker=recorder, time_budget_s=500, resume=True)
    steps = [step for step, _ in recorder.metrics]
    assert min(steps) == 41 and max(steps) == 50
    a = load_file(str(tmp_path / "a" / "run" / "regression" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "regression" / "model.safetensors"))
    torch.testing.assert_close(a["weight"], b["weight"], atol=0, rtol=0)
    assert json.loads((tmp_path / "b" / "run" / "regression_history.json").read_text())["budget_decay"] == [30, 50]


def test_autoencoder_config_mirrors_the_constructor():
    """Every keyword of `TextAutoencoder.from_backbone` is an ``autoencoder.model`` setting (with the same
    default) that `TextAutoencoder.from_config` passes on, or one of the three training settings it takes."""
    params = {
        name: p
        for name, p in inspect.signature(TextAutoencoder.from_backbone).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    defaults = AutoencoderTrainingConfig()
    backbone, model_kwargs = backbone_arguments(dataclasses.asdict(defaults.model))
    training = {"alignment_weight", "latent_noise_std", "kl_weight"}
    missing = sorted(set(params) - set(model_kwargs) - training)
    assert not missing, f"add config fields for {missing}"
    assert not set(model_kwargs) - set(params), "a model setting that from_backbone does not take"
    assert training <= set(vars(defaults))
    assert backbone == "facebook/bart-base"
    assert {k: v for k, v in model_kwargs.items() if v != params[k].default} == {}
    # the loop settings live in one place, shared by both stages
    loop_fields = set(TrainingLoopConfig.__dataclass_fields__)
    assert loop_fields <= set(AutoencoderTrainingConfig.__dataclass_fields__)
    assert not loop_fields & set(params)
