"""`latentlm train` and `latentlm sample` end to end on a tiny config; the MLflow runs and pyfunc model they leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from latentlm.cli import main


def tiny_config(output_dir: Path, data_dir: Path, backbone: str, tracking_uri: str) -> dict:
    return {
        "output_dir": str(output_dir),
        "data": {"path": str(data_dir), "label_column": "label", "max_eval_samples": 4},
        "autoencoder": {
            "model": {
                "backbone": backbone,
                "max_length": 16,
                "num_latents": 4,
                "latent_dim": 8,
                "num_compression_layers": 1,
                "num_reconstruction_layers": 1,
                "head_dim": 16,
            },
            "eval_num_beams": 1,
            "optimizer": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 4, "warmup_steps": 0},
            "eval_every": 0,
            "save_every": 2,
            "log_every": 1,
        },
        "diffusion": {
            "denoiser_size": "tiny",
            "optimizer": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 4, "warmup_steps": 0},
            "sample_every": 0,
            "save_every": 2,
            "log_every": 1,
            "num_samples_per_class": 2,
            "sample_inference_steps": 3,
        },
        "tracking": {"tracking_uri": tracking_uri, "experiment_name": "latentlm-test"},
    }


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bart_dir):
    """`latentlm train` once for the module: (output_dir, tracking_uri)."""
    import os
    import random

    import numpy as np
    from conftest import SENTENCES

    root = tmp_path_factory.mktemp("cli_run")
    data = root / "data"
    data.mkdir()
    for split, rows in (("train", SENTENCES[:32]), ("validation", SENTENCES[32:])):
        with open(data / f"{split}.jsonl", "w") as f:
            for i, text in enumerate(rows):
                f.write(json.dumps({"text": text, "label": "even" if i % 2 == 0 else "odd"}) + "\n")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(root / "run", data, tiny_bart_dir, tracking_uri)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert main(["train", "--config", str(config_path)]) == 0
    return root / "run", tracking_uri, config_path


def test_train_writes_pipeline_and_samples(trained_run, capsys):
    output_dir, _, _ = trained_run
    pipeline = output_dir / "pipeline"
    assert (pipeline / "model_index.json").is_file()
    for component in ("tokenizer", "language_model", "autoencoder", "denoiser", "scheduler"):
        assert (pipeline / component).is_dir(), component
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert [row["class"] for row in samples] == ["even", "even", "odd", "odd"]
    assert all(isinstance(row["text"], str) for row in samples)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["pipeline"] == str(pipeline) and summary["mlflow_run_id"]
    # stage 1 encoded the corpus once, into the folder stage 2's latent cache compressed from
    assert len(list((output_dir / "encoder_cache").iterdir())) == 1


def test_sample_command(trained_run, tmp_path, capsys):
    output_dir, _, _ = trained_run
    out = tmp_path / "samples.jsonl"
    args = [
        "sample",
        "--pipeline",
        str(output_dir / "pipeline"),
        "--class",
        "odd",
        "-n",
        "3",
        "--guidance",
        "2.0",
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written and len(written) == 3
    assert all(row["class"] == "odd" for row in written)
    # the same seed gives the same texts
    assert main(args) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == written


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++", "unipc", "euler", None])
def test_sample_function_every_scheduler(trained_run, scheduler):
    from latentlm.sampling import sample

    output_dir, _, _ = trained_run
    rows = sample(
        output_dir / "pipeline",
        class_name="1",
        num_samples=3,
        guidance_scale=1.5,
        num_inference_steps=3,
        scheduler=scheduler,
        seed=0,
        batch_size=2,
    )
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert [row["seed"] for row in rows] == [0, 0, 1]  # batch k uses seed + k
    assert all(row["class"] == "odd" for row in rows)  # "1" is read as a class id


def test_sample_bad_input(trained_run):
    from latentlm.sampling import sample

    pipeline = trained_run[0] / "pipeline"
    with pytest.raises(ValueError, match="Unknown scheduler"):
        sample(pipeline, num_samples=1, scheduler="heun-magic")
    with pytest.raises(ValueError, match="unknown class name 'three'"):
        sample(pipeline, class_name="three", num_samples=1, num_inference_steps=2)
    with pytest.raises(ValueError, match="needs class_labels"):
        sample(pipeline, num_samples=1, guidance_scale=3.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_interval must be"):
        sample(pipeline, class_name="odd", num_samples=1, guidance_scale=3.0, guidance_interval=(0.7, 0.2))
    with pytest.raises(FileNotFoundError):
        sample(trained_run[0] / "nothing-here", num_samples=1)


def test_mlflow_parent_and_nested_runs(trained_run):
    from mlflow import MlflowClient

    output_dir, tracking_uri, _ = trained_run
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("latentlm-test")
    runs = client.search_runs([experiment.experiment_id])
    parent_id = json.loads((output_dir / "train_summary.json").read_text())["mlflow_run_id"]
    parent = client.get_run(parent_id)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"autoencoder", "diffusion"}
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    # every logged training step is there
    losses = client.get_metric_history(children["diffusion"].info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    assert client.get_metric_history(children["autoencoder"].info.run_id, "train/loss")
    assert parent.data.params["autoencoder.model.num_latents"] == "4"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"pipeline", "model", "samples.json"} <= artifacts
    assert "pipeline/model_index.json" in {a.path for a in client.list_artifacts(parent_id, "pipeline")}


def test_pyfunc_model_round_trip(trained_run):
    import mlflow
    import pandas as pd

    output_dir, tracking_uri, _ = trained_run
    parent_id = json.loads((output_dir / "train_summary.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{parent_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    frame = pd.DataFrame({"class": ["odd", "even"], "num_samples": [2, 1]})
    params = {"num_inference_steps": 3, "guidance_scale": 2.0, "seed": 1, "scheduler": "ddim"}
    result = model.predict(frame, params=params)
    assert list(result.columns) == ["class", "text", "row"]
    assert result["class"].tolist() == ["odd", "odd", "even"] and result["row"].tolist() == [0, 0, 1]
    # the same texts as the pipeline itself with the same settings
    from latentlm.sampling import sample

    direct = sample(
        output_dir / "pipeline",
        class_name="odd",
        num_samples=2,
        guidance_scale=2.0,
        num_inference_steps=3,
        scheduler="ddim",
        seed=1,
    )
    assert result["text"].tolist()[:2] == [row["text"] for row in direct]
    # the local copy loads too, and unconditional rows work
    local = mlflow.pyfunc.load_model(str(output_dir / "mlflow_model"))
    unconditional = local.predict(pd.DataFrame({"num_samples": [2]}), params={"num_inference_steps": 2})
    assert len(unconditional) == 2
    # bad input reaching the model (MLflow's own schema check drops unknown columns before)
    from latentlm.mlflow.pyfunc import PipelinePyfunc

    direct_model = PipelinePyfunc(output_dir / "pipeline")
    with pytest.raises(ValueError, match="unknown input columns \\['prompt'\\]"):
        direct_model.predict(pd.DataFrame({"prompt": ["x"]}))
    with pytest.raises(ValueError, match="unknown class name"):
        direct_model.predict(pd.DataFrame({"class": ["nope"], "num_samples": [1]}), {"num_inference_steps": 2})


def test_train_resume_skips_finished_stages(trained_run, caplog):
    from latentlm.config import load_config
    from latentlm.training.run import train

    output_dir, _, config_path = trained_run
    before = (output_dir / "autoencoder" / "autoencoder").stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        path = train(load_config(config_path), resume=True)
    assert path == output_dir / "pipeline"
    assert "Stage 1 already finished" in caplog.text and "Stage 2 already finished" in caplog.text
    assert (output_dir / "autoencoder" / "autoencoder").stat().st_mtime_ns == before


def test_run_in_new_process_returns_the_result_or_raises_the_error():
    import os

    from latentlm.training.run import run_in_new_process

    assert run_in_new_process(os.getpid) != os.getpid()
    assert run_in_new_process(divmod, 7, 2) == (3, 1)
    with pytest.raises(ValueError, match="invalid literal"):
        run_in_new_process(int, "seven")
    with pytest.raises(RuntimeError, match="ended without a result .* `--resume`"):
        run_in_new_process(os._exit, 3)


def test_a_stage_process_ends_with_the_process_that_started_it(tmp_path):
    # A killed `latentlm train` leaves no orphaned stage training on beside the run resumed after it.
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(
        "import time\nfrom latentlm.training.run import run_in_new_process\n"
        "if __name__ == '__main__':\n    run_in_new_process(time.sleep, 300)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline, workers = time.monotonic() + 60, []
        while not workers and time.monotonic() < deadline:
            time.sleep(0.2)
            children = psutil.Process(parent.pid).children()
            workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert workers, "the new process did not start"
        time.sleep(1.0)  # let it reach time.sleep
        parent.kill()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "the new process outlived the one that started it"
    finally:
        parent.kill()
        parent.wait()


def test_train_command_isolates_stages_unless_asked_to_stay_in_process(trained_run, monkeypatch):
    import latentlm.training.run

    _, _, config_path = trained_run
    calls = []
    monkeypatch.setattr(latentlm.training.run, "train", lambda config, **kwargs: calls.append(kwargs) or Path("x"))
    assert main(["train", "--config", str(config_path)]) == 0
    assert main(["train", "--config", str(config_path), "--in-process"]) == 0
    assert [kwargs["isolate_stages"] for kwargs in calls] == [True, False]


def test_a_tracker_pickles_without_its_client_and_still_serves_as_parent(tmp_path):
    import pickle

    from latentlm.config import TrackingConfig
    from latentlm.mlflow.tracking import Tracker

    parent = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), run_name="train")
    with parent:
        copy = pickle.loads(pickle.dumps(parent))
        assert copy._client is None and (copy.run_id, copy.run_name) == (parent.run_id, "train")
        with Tracker(parent.cfg, run_name="stage", parent=copy, fallback_dir=tmp_path) as child:
            child.log_metrics({"loss": 1.0}, 0)
    import mlflow

    run = mlflow.MlflowClient(parent.cfg.tracking_uri).get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.metrics["loss"] == 1.0


def _copy_of_the_run(trained_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the module's trained run to change (its output_dir) and its config file."""
    import shutil

    run_dir, _, config_path = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", config_path


def _decoder_tuning_sets(run: Path, *extra: str) -> list[str]:
    """``--set`` values that add a 3-step decoder tuning (batch 4) to the copied run, untracked."""
    return [
        f"output_dir={run}",
        "tracking.enabled=false",
        "decoder_tuning.enabled=true",
        "decoder_tuning.optimizer.max_steps=3",
        "decoder_tuning.optimizer.batch_size=4",
        *extra,
    ]


def test_train_tunes_the_decoder_of_a_finished_run(trained_run, tmp_path, caplog, monkeypatch):
    # decoder_tuning added to a finished run: stages 1 and 2 are kept, stage 1's decoder side trains
    # on with the latents unchanged, and the pipeline is rebuilt with it.

    from safetensors.torch import load_file

    import latentlm.training.run
    from latentlm import LatentTextDiffusionPipeline, TextAutoencoder

    stages_in_new_processes = []

    def spy(function, *args, name):  # `latentlm train` runs each stage in a new process
        stages_in_new_processes.append((name, args[1].__name__))
        return run_in_new_process(function, *args, name=name)

    run_in_new_process = latentlm.training.run.run_in_new_process
    monkeypatch.setattr(latentlm.training.run, "run_in_new_process", spy)

    run, config_path = _copy_of_the_run(trained_run, tmp_path)
    sets = _decoder_tuning_sets(run, "decoder_tuning.latent_noise_std=1.0", "decoder_tuning.save_every=2")
    with caplog.at_level("WARNING"):
        assert main(["train", "--config", str(config_path), "--resume", *[x for s in sets for x in ("--set", s)]]) == 0
    assert "Stage 1 already finished" in caplog.text and "Stage 2 already finished" in caplog.text
    assert stages_in_new_processes == [("Decoder tuning", "tune_decoder")]
    assert json.loads((run / "decoder_history.json").read_text())["final_step"] == 3
    assert len(list((run / "encoder_cache").iterdir())) == 1  # the tuning read stage 1's encoder states
    stage1, tuned = (
        TextAutoencoder.from_pretrained(run / "autoencoder"),
        TextAutoencoder.from_pretrained(run / "decoder"),
    )
    assert tuned.latent_noise_std == 1.0 and stage1.latent_noise_std == 0.0

    weights = {
        name: load_file(str(folder / "autoencoder" / "diffusion_pytorch_model.safetensors"))
        for name, folder in (("stage1", run / "autoencoder"), ("tuned", run / "decoder"), ("pipe", run / "pipeline"))
    }
    frozen_ids = {id(p) for p in stage1.autoencoder.compression_parameters()}
    compression = {name for name, p in stage1.autoencoder.named_parameters() if id(p) in frozen_ids}
    assert compression and len(compression) < len(weights["stage1"])
    for key in weights["stage1"]:
        assert torch.equal(weights["stage1"][key], weights["tuned"][key]) == (key in compression), key
        assert torch.equal(weights["pipe"][key], weights["tuned"][key]), key  # the pipeline has the tuned decoder
    pipe = LatentTextDiffusionPipeline.from_pretrained(run / "pipeline")
    texts = ["the cat sat on the mat", "a dog ran in the park"]
    torch.testing.assert_close(pipe.encode(texts), stage1.encode(texts), atol=0, rtol=0)  # stage 2's latents

    caplog.clear()
    with caplog.at_level("WARNING"):
        main(["train", "--config", str(config_path), "--resume", *[x for s in sets for x in ("--set", s)]])
    assert "Decoder tuning already finished" in caplog.text


def test_train_tunes_the_decoder_on_the_denoisers_predictions_after_stage_2(trained_run, tmp_path, monkeypatch):
    # latent_source: denoiser: the tuning runs after stage 2 and its decoder reads what stage 2's denoiser
    # makes of each text's noised latents (the class of the text given), not the latents themselves.

    import latentlm.diffusion

    from latentlm import LatentTextDiffusionPipeline, TextAutoencoder

    calls = []
    real = latentlm.diffusion.denoised_latents

    def spy(denoiser, scheduler, latents, noise_levels, class_labels=None, generator=None, **context):
        calls.append((type(denoiser).__name__, tuple(noise_levels), class_labels))
        assert context == {"encoder_hidden_states": None, "encoder_attention_mask": None}  # no source here
        out = real(denoiser, scheduler, latents, noise_levels, class_labels=class_labels, generator=generator)
        assert not torch.allclose(out, latents)
        return out

    monkeypatch.setattr(latentlm.diffusion, "denoised_latents", spy)
    run, config_path = _copy_of_the_run(trained_run, tmp_path)
    sets = _decoder_tuning_sets(
        run,
        "decoder_tuning.latent_source=denoiser",
        "decoder_tuning.denoiser_noise_levels=[0.2, 0.6]",
        "decoder_tuning.latent_noise_std=0",
    )
    (run / ".tmp-pipeline-deadbeef").mkdir()  # left by a run killed while writing its pipeline
    argv = ["train", "--config", str(config_path), "--resume", "--in-process"]
    assert main([*argv, *[x for s in sets for x in ("--set", s)]]) == 0
    assert not list(run.glob(".tmp-pipeline-*"))
    assert len(calls) == 3 and {c[:2] for c in calls} == {("LatentDenoiser", (0.2, 0.6))}
    assert all(c[2] is not None and c[2].shape == (4,) for c in calls)  # each text's class
    assert json.loads((run / "decoder_history.json").read_text())["final_step"] == 3
    stage1, tuned = (
        TextAutoencoder.from_pretrained(run / "autoencoder"),
        TextAutoencoder.from_pretrained(run / "decoder"),
    )
    texts = ["the cat sat on the mat", "a dog ran in the park"]
    torch.testing.assert_close(tuned.encode(texts), stage1.encode(texts), atol=0, rtol=0)  # stage 2's latents
    changed = [
        name
        for (name, a), b in zip(stage1.autoencoder.named_parameters(), tuned.autoencoder.parameters())
        if not torch.equal(a, b)
    ]
    assert changed and all(name.startswith("reconstruction") or "latent" in name for name in changed), changed
    pipe = LatentTextDiffusionPipeline.from_pretrained(run / "pipeline")
    torch.testing.assert_close(
        pipe.autoencoder.from_latent.weight, tuned.autoencoder.from_latent.weight, atol=0, rtol=0
    )  # the pipeline decodes with the tuned decoder


def test_denoiser_decoder_tuning_needs_stage_2(trained_run):
    from latentlm.config import load_config
    from latentlm.training.stages.decoder_tuning import DecoderTuningStage

    run_dir, _, config_path = trained_run
    config = load_config(config_path, ["decoder_tuning.latent_source=denoiser"])
    with pytest.raises(ValueError, match="pass diffusion_path"):
        DecoderTuningStage(config, run_dir / "autoencoder")
    for bad, match in (
        ("latent_source=clean", "latent_source='clean'"),
        ("denoiser_noise_levels=[0.5, 0.2]", "low <= high"),
    ):
        with pytest.raises(ValueError, match=match):
            load_config(config_path, [f"decoder_tuning.{bad}"]).validate()


def test_resume_sends_the_queued_calls_of_finished_stages_to_their_runs(trained_run, tmp_path):
    # Calls queued while the tracking server was down (mlflow_unsent.jsonl) reach the run of the stage that
    # made them, although a resumed run skips that finished stage.
    import shutil

    from mlflow import MlflowClient

    run_dir, tracking_uri, config_path = trained_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    queued = [
        {"run_name": "diffusion", "op": "log_metrics", "metrics": {"queued/loss": 0.25}, "step": 7, "timestamp": 1},
        {"run_name": "autoencoder", "op": "log_params", "params": [["queued.param", "1"]]},
    ]
    (run / "mlflow_unsent.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queued))
    assert main(["train", "--config", str(config_path), "--resume", "--in-process", "--set", f"output_dir={run}"]) == 0
    runs = json.loads((run / "mlflow_runs.json").read_text())
    client = MlflowClient(tracking_uri)
    assert client.get_run(runs["train/diffusion"]["run_id"]).data.metrics["queued/loss"] == 0.25
    assert client.get_run(runs["train/autoencoder"]["run_id"]).data.params["queued.param"] == "1"
    unsent = run / "mlflow_unsent.jsonl"
    left = [json.loads(line) for line in unsent.read_text().splitlines()] if unsent.exists() else []
    # only calls MLflow refused stay on disk (here: the parent's params, changed by the new output_dir)
    assert all("error" in row and row["run_name"] == "train" for row in left), left


def test_cli_rejects_bad_config(tmp_path, capsys):
    from latentlm.cli import run

    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nautoencoder: {backbon: minilm}\n")
    with pytest.raises(ValueError, match="backbon"):
        main(["train", "--config", str(bad)])
    # the command prints the message, not a traceback (--debug shows it)
    assert run(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentlm: error: Unknown config key 'autoencoder.backbon'") and "Traceback" not in err
    with pytest.raises(ValueError, match="backbon"):
        run(["--debug", "train", "--config", str(bad)])


def test_time_budget_stops_a_stage_early(trained_run, tmp_path):
    run_dir, _, config_path = trained_run
    out = tmp_path / "budget"
    sets = [f"output_dir={out}", "tracking.enabled=false", "diffusion.optimizer.max_steps=10000"]
    args = ["train-diffusion", "--config", str(config_path), "--autoencoder", str(run_dir / "autoencoder")]
    assert main([*args, *[x for s in sets for x in ("--set", s)], "--time-budget", "0.001"]) == 0
    history = json.loads((out / "diffusion_history.json").read_text())
    assert 1 <= history["final_step"] < 10000
    assert (out / "diffusion" / "denoiser").is_dir()
