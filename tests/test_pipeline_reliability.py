"""Pipeline reliability: concurrent calls from several threads, dtype mixes after save/load."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny_pipeline
from latentlm.pipelines import LatentTextDiffusionPipeline, make_scheduler

from latentlm.sampling import sample_texts

FAST = dict(num_beams=1, max_length=8, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0)


@pytest.fixture
def pipe(tiny_bart_dir):
    return make_tiny_pipeline(tiny_bart_dir)


def call(pipe, seed: int, steps: int, scheduler=None):
    return pipe(
        num_samples=2,
        class_labels="odd",
        guidance_scale=2.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        decode_kwargs=FAST,
        scheduler=scheduler,
    )


@pytest.mark.parametrize("name", ["dpm++", "unipc", "euler", "ddim"])
def test_concurrent_calls_equal_the_same_calls_alone(pipe, name):
    """Four threads, each with its own seed and step count, on one pipeline and one scheduler config."""
    pipe.scheduler = make_scheduler(pipe.scheduler, name)
    jobs = [(seed, steps) for seed, steps in zip(range(4), (3, 5, 7, 4))]
    alone = {job: call(pipe, *job) for job in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def worker(job):
        try:
            barrier.wait()
            for _ in range(3):
                results.setdefault(job, []).append(call(pipe, *job))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for job, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out.latents, alone[job].latents, atol=1e-5, rtol=0)
            assert out.texts == alone[job].texts


def test_a_call_leaves_the_pipeline_scheduler_untouched(pipe):
    before = dict(pipe.scheduler.config), pipe.scheduler.num_inference_steps
    scheduler = make_scheduler(pipe.scheduler, "dpm++")
    call(pipe, 0, 4, scheduler=scheduler)
    assert (dict(pipe.scheduler.config), pipe.scheduler.num_inference_steps) == before
    assert scheduler.num_inference_steps is None  # the call stepped its own copy


def test_sample_texts_seeds_each_batch_and_leaves_the_pipeline_alone(pipe):
    before = pipe.scheduler
    scheduler = make_scheduler(pipe.scheduler, "ddim")
    assert make_scheduler(pipe.scheduler, scheduler) is scheduler  # an instance is used as it is
    rows = sample_texts(
        pipe, 3, class_name="1", scheduler=scheduler, num_inference_steps=2, seed=4, batch_size=2, decode_kwargs=FAST
    )
    assert [(r["class"], r["seed"], r["index"]) for r in rows] == [("odd", 4, 0), ("odd", 4, 1), ("odd", 5, 2)]
    assert pipe.scheduler is before and scheduler.num_inference_steps is None
    # batch k is seeded with seed + k alone: the last batch is the same as a call seeded with 5
    (alone,) = sample_texts(
        pipe, 1, class_name="odd", scheduler="ddim", num_inference_steps=2, seed=5, decode_kwargs=FAST
    )
    assert alone["text"] == rows[2]["text"]
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        sample_texts(pipe, 0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        sample_texts(pipe, 1, batch_size=0)


def test_bf16_save_reload_and_mixed_dtypes_sample(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "fp32")
    bf16 = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    again = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "bf16")
    again.set_progress_bar_config(disable=True)
    # Whatever dtype each component came back in, sampling and decoding work.
    out = call(again, 0, 3)
    assert len(out.texts) == 2
    again.language_model.to(torch.bfloat16)
    again.autoencoder.to(torch.float32)
    again.denoiser.to(torch.float32)
    assert len(call(again, 0, 3).texts) == 2
    assert len(again.decode(again.encode(["the cat sat on the mat"]), **FAST)) == 1


def test_bad_arguments_get_clear_errors(pipe):
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got True"):
        pipe(num_samples=True)
    with pytest.raises(ValueError, match="class_labels=2.0: give a class name"):
        pipe(num_samples=1, class_labels=2.0)
    for bad in (float("nan"), float("inf"), -2.0):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
            pipe(num_samples=1, class_labels="odd", guidance_scale=bad)
    with pytest.raises(TypeError, match="decode\\(\\) takes a latent tensor"):
        pipe.decode(None)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b'{"text": "a"}\n{"text": "b"\n', "line 2: not valid JSON"),
        (b'{"text": "caf\xe9"}\n', "is not UTF-8 \\(line 1"),
        (b'{"text": "a"}\n["b"]\n', "line 2: expected a JSON object"),
        (b'{"text": "fine"}\n{"text": "half \\ud800 a pair"}\n', "line 2: 'text' holds a lone surrogate"),
    ],
)
def test_bad_data_files_name_the_file_and_line(tmp_path, content, message):
    from latentlm.config import DataConfig
    from latentlm.data.loading import load_texts

    path = tmp_path / "texts.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_texts(DataConfig(path=str(path)), "train")
    assert "texts.jsonl" in str(info.value)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_unsupported_schedulers_are_refused_naming_the_supported_ones(pipe, name):
    import diffusers

    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=f"{name} is not supported.*DPMSolverMultistepScheduler"):
        pipe(num_samples=1, num_inference_steps=5, scheduler=scheduler, output_type="latent")


def test_every_compatible_scheduler_is_either_supported_or_refused(pipe):
    """A new diffusers scheduler must be measured (benchmarks/scheduler_support.py) and listed."""
    from latentlm.pipelines.pipeline_latent_text_diffusion import SUPPORTED_SCHEDULERS, UNSUPPORTED_SCHEDULERS

    known = set(SUPPORTED_SCHEDULERS) | set(UNSUPPORTED_SCHEDULERS)
    # EDMEuler has no alphas_cumprod (refused as such); DPMSolverSDE needs the optional torchsde package
    untested = {"EDMEulerScheduler", "DPMSolverSDEScheduler"}
    compatible = {cls.__name__ for cls in pipe.scheduler.compatibles}
    assert compatible - untested <= known, sorted(compatible - untested - known)
    for name in SUPPORTED_SCHEDULERS:
        import diffusers

        scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
        out = pipe(
            num_samples=2,
            num_inference_steps=6,
            scheduler=scheduler,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(out.latents).all(), name


def test_read_texts_says_how_many_empty_rows_it_leaves_out(tmp_path, caplog):
    import json
    import logging

    from latentlm.data.loading import read_texts

    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "a"}) + "\n" for t in ["one", "", "three", "  "]))
    with caplog.at_level(logging.WARNING, logger="latentlm.data.loading"):
        texts, labels = read_texts(path, label_column="label")
    assert texts == ["one", "three"] and labels == ["a", "a"]
    assert "2 of 4 rows have an empty 'text' and are left out" in caplog.text


@pytest.mark.parametrize("damaged", ["model_index.json", "tokenizer/tokenizer.json", "denoiser/config.json"])
def test_a_damaged_json_file_in_a_pipeline_folder_is_named(pipe, tmp_path, damaged):
    from latentlm.pipelines import LatentTextDiffusionPipeline

    pipe.save_pretrained(tmp_path / "pipe")
    path = tmp_path / "pipe" / damaged
    assert path.is_file()
    path.write_text('{"truncated": ')
    with pytest.raises(ValueError, match=f"{damaged}' is not valid JSON"):
        LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")


def test_one_class_is_refused_for_a_class_conditional_model():
    from latentlm.data.labels import resolve_class_labels

    with pytest.raises(ValueError, match="Every training example has the label 'movie'.*at least two classes"):
        resolve_class_labels(["movie"] * 5)
    assert resolve_class_labels(["b", "a", "b"]) == ([1, 0, 1], ["a", "b"])


def test_a_failed_call_says_what_to_do_and_leaves_the_pipeline_usable(pipe, monkeypatch):
    before = call(pipe, seed=3, steps=4)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer, got 0"):
        call(pipe, seed=3, steps=0)

    def broken(pipe_, step, timestep, tensors):
        if step == 2:
            raise KeyError("latents_x")
        return {}

    with pytest.raises(RuntimeError, match="callback_on_step_end raised KeyError at step 2") as raised:
        pipe(num_samples=2, class_labels="odd", num_inference_steps=4, callback_on_step_end=broken)
    assert isinstance(raised.value.__cause__, KeyError)
    real_forward = type(pipe.denoiser).forward

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: 1 TB")

    monkeypatch.setattr(type(pipe.denoiser), "forward", out_of_memory)
    with pytest.raises(MemoryError, match="A batch of 2 samples does not fit in memory.*smaller num_samples"):
        call(pipe, seed=3, steps=4)
    monkeypatch.setattr(type(pipe.denoiser), "forward", real_forward)
    after = call(pipe, seed=3, steps=4)
    assert after.texts == before.texts
    torch.testing.assert_close(after.latents, before.latents)


@pytest.mark.parametrize("native", [True, False])
def test_the_language_model_decodes_in_bf16_where_asked(pipe, tmp_path, monkeypatch, native):
    from latentlm import hardware
    from latentlm.sampling import load_pipeline

    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: native)
    auto = load_pipeline(tmp_path / "pipe", language_model_dtype="auto")
    assert auto.language_model.dtype == (torch.bfloat16 if native else torch.float32)
    assert auto.denoiser.dtype == torch.float32  # only the language model changes precision
    texts = auto(num_samples=2, class_labels="odd", num_inference_steps=3, decode_kwargs=FAST).texts
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="language_model_dtype='half'"):
        load_pipeline(tmp_path / "pipe", language_model_dtype="half")
