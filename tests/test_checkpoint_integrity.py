"""Damaged checkpoints are found by their checksums, named, and skipped for the newest intact one."""

from __future__ import annotations

import json

import pytest
import torch

from latentlm.training.checkpoints import CheckpointManager, DamagedCheckpointError, verify_checkpoint


def _training_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _save_two(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, fingerprint="abc")
    saved = {}
    for step in (1, 2):
        model, optimizer, scheduler = _training_state(step)
        manager.save(step, {"model": model}, optimizer, scheduler)
        saved[step] = model.weight.detach().clone()
    return manager, saved


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, name",
    [
        (_truncate, "model.safetensors"),
        (_flip_a_byte, "optimizer.safetensors"),
        (lambda p: p.unlink(), "model.safetensors"),
    ],
)
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(tmp_path, caplog, damage, name):
    manager, saved = _save_two(tmp_path)
    newest = manager.root / "step_00000002"
    assert json.loads((newest / "checksums.json").read_text()).keys() >= {name, "trainer_state.json"}
    verify_checkpoint(newest)
    damage(newest / name)
    with pytest.raises(DamagedCheckpointError, match=name):
        verify_checkpoint(newest)
    with caplog.at_level("WARNING"):
        chosen = manager.prepare(resume=True)
    assert chosen == manager.root / "step_00000001" and manager.latest() == chosen
    assert "Skipping damaged checkpoint step_00000002" in caplog.text and name in caplog.text
    model, optimizer, scheduler = _training_state(7)
    assert manager.load(chosen, {"model": model}, optimizer, scheduler)["step"] == 1
    torch.testing.assert_close(model.weight, saved[1], atol=0, rtol=0)


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path):
    manager, _ = _save_two(tmp_path)
    for step in (1, 2):
        _flip_a_byte(manager.root / f"step_0000000{step}" / "model.safetensors")
    with pytest.raises(
        DamagedCheckpointError, match=r"Every checkpoint .* is damaged: .*step_00000002.*step_00000001.*--overwrite"
    ):
        manager.prepare(resume=True)
    assert manager.prepare(resume=True, overwrite=True) is None  # --overwrite starts over
