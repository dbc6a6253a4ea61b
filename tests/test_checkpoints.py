"""Training checkpoints: saved whole or not at all, found by 'latest', verified before a resume, pruned to N."""
import json
import logging

import pytest
import torch
from torch import nn

from chest_model.checkpoints import CheckpointError, list_checkpoints, resolve_checkpoint, save_checkpoint, verify_checkpoint
from helpers import flip_a_byte


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.trained = (model, optimizer)  # what _step trains; save_state saves both
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)  # the next test builds its own


def _step(accelerator) -> None:
    """One optimizer step, so weights and momentum change between checkpoints."""
    model, optimizer = accelerator.trained
    accelerator.backward(model(torch.randn(8, 4)).square().mean())
    optimizer.step()
    optimizer.zero_grad()


def test_save_then_resume_from_latest_restores_the_weights(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    assert resolve_checkpoint("latest", root) is None  # nothing saved yet: start from scratch
    _step(accelerator)
    save_checkpoint(accelerator, root, 5, {"epoch": 0, "global_step": 5})
    saved = accelerator.trained[0].weight.detach().clone()
    _step(accelerator)
    final = save_checkpoint(accelerator, root, 10, {"epoch": 1, "global_step": 10})
    assert final == root / "step_00000010"
    assert list_checkpoints(root) == [root / "step_00000005", final]
    assert resolve_checkpoint("latest", root) == final
    assert resolve_checkpoint(str(root / "step_00000005"), root) == root / "step_00000005"
    assert verify_checkpoint(final) == {"epoch": 1, "global_step": 10}
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert "model.safetensors" in manifest and "trainer_state.json" in manifest
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left

    assert not torch.equal(accelerator.trained[0].weight.detach(), saved)
    accelerator.load_state(str(root / "step_00000005"))
    assert torch.equal(accelerator.trained[0].weight.detach(), saved)


def test_only_the_newest_n_are_kept_and_a_step_can_be_saved_again(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _step(accelerator)
        save_checkpoint(accelerator, root, step, {"global_step": step}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    save_checkpoint(accelerator, root, 4, {"global_step": 4, "again": True}, keep=2)  # replaces the folder
    assert verify_checkpoint(root / "step_00000004") == {"global_step": 4, "again": True}
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


def test_incomplete_and_temporary_folders_are_not_checkpoints(tmp_path, accelerator, caplog):
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, {"global_step": 1})
    (root / ".tmp-step_00000002-abcdef").mkdir()  # a save interrupted before its rename
    (root / "step_00000003").mkdir()  # no manifest
    assert list_checkpoints(root) == [root / "step_00000001"]
    with caplog.at_level(logging.WARNING, logger="chest_model.checkpoints"):
        assert resolve_checkpoint("latest", root) == root / "step_00000001"
    assert "step_00000003 has no manifest" in caplog.text and "passed over for step_00000001" in caplog.text
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        verify_checkpoint(root / "step_00000003")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint(str(root / "step_00000099"), root)


def test_a_corrupted_or_missing_file_is_detected(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    path = save_checkpoint(accelerator, root, 1, {"global_step": 1})
    weights = path / "model.safetensors"
    flip_a_byte(weights)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        verify_checkpoint(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        verify_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify_checkpoint(path)


def test_a_failed_save_leaves_no_folder_and_the_old_checkpoints_intact(tmp_path, accelerator, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, {"global_step": 1})
    real_save_state = accelerator.save_state

    def save_then_fail(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(accelerator, "save_state", save_then_fail)
    with pytest.raises(CheckpointError, match=r"could not be written \(disk full\)"):
        save_checkpoint(accelerator, root, 2, {"global_step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    assert verify_checkpoint(root / "step_00000001") == {"global_step": 1}


def test_a_resume_with_other_settings_names_each_and_ignores_settings_one_version_lacks(tmp_path):
    from chest_model.checkpoints import check_same_recipe

    saved = {"lr": 0.001, "data_dir": ["a", "b"], "num_processes": 2, "removed_since": 1}
    check_same_recipe(tmp_path, saved, {"lr": 0.001, "data_dir": ["a", "b"], "num_processes": 2, "added_since": 0})
    check_same_recipe(tmp_path, None, {"lr": 0.1})  # a checkpoint from before settings were recorded
    with pytest.raises(CheckpointError) as info:
        check_same_recipe(tmp_path, saved, {"lr": 0.01, "data_dir": ["a"], "num_processes": 1})
    message = str(info.value)
    assert "--lr 0.001 (now 0.01)" in message and "--data-dir a b (now a)" in message
    assert "accelerate launch --num_processes 2 (now 1)" in message and "--num-processes" not in message


def test_extra_tensors_are_saved_as_safetensors_and_checked_by_the_manifest(tmp_path, accelerator):
    from chest_model.checkpoints import load_tensors

    average = {"n_averaged": torch.tensor(3), "module.weight": torch.randn(4, 2).t()}  # not contiguous
    path = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, {"epoch": 1}, tensors={"ema": average})
    assert not list(path.glob("custom_checkpoint_*"))  # what accelerate would load with weights_only=False
    assert "ema.safetensors" in json.loads((path / "manifest.json").read_text())["files"]
    loaded = load_tensors(path, "ema")
    assert loaded.keys() == average.keys() and all(torch.equal(loaded[k], average[k]) for k in average)
    assert load_tensors(path, "absent") is None


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled: this ran code",))


def test_an_older_checkpoints_pickled_state_is_read_as_plain_values_only(tmp_path, capsys):
    from chest_model.checkpoints import legacy_state, load_tensors

    torch.save({"last_epoch": 4, "base_lrs": [0.1]}, tmp_path / "custom_checkpoint_0.pkl")
    torch.save({"n_averaged": torch.tensor(2)}, tmp_path / "custom_checkpoint_1.pkl")
    assert legacy_state(tmp_path, 0) == {"last_epoch": 4, "base_lrs": [0.1]}
    assert int(load_tensors(tmp_path, "ema", legacy_index=1)["n_averaged"]) == 2
    assert legacy_state(tmp_path, 2) is None

    torch.save({"scheduler": _RunsCode()}, tmp_path / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: cannot be read as tensors and plain values"):
        legacy_state(tmp_path, 0)
    assert "unpickled" not in capsys.readouterr().out


@pytest.mark.parametrize("manifest", ['{"files": ["model.safetensors"]}', '{"files": {}}', "[]"])
def test_a_malformed_manifest_is_a_checkpoint_error(tmp_path, accelerator, manifest):
    path = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, {"epoch": 1})
    (path / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify_checkpoint(path)


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(tmp_path, accelerator, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, {"global_step": 1})

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 472")  # torch.save's writer

    monkeypatch.setattr(accelerator, "save_state", full_disk)
    with pytest.raises(CheckpointError, match=r"step_00000002: the checkpoint could not be written .*step_00000001 is intact"):
        save_checkpoint(accelerator, root, 2, {"global_step": 2})
    assert list_checkpoints(root) == [root / "step_00000001"] and [p.name for p in root.iterdir()] == ["step_00000001"]
