"""Training's main([...]) in this process: a one-epoch run on tiny synthetic data gives a loadable model.

The subprocess tests in test_training.py cover launchers, resumes and kills; this one calls the
entry point directly, so a failure shows its traceback here and coverage sees the training code.
"""
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from chest_model import ChestXrayClassifier
from chest_model.data import DatasetError
from chest_model.training import main, rebuild_split
from helpers import CLASS_NAMES, make_class_folders, synthetic_xray, write_image


def test_main_trains_one_epoch_and_saves_a_loadable_model(tmp_path, clean_accelerate):
    data = make_class_folders(tmp_path / "data", per_class=5, size=40, seed=6)
    out = tmp_path / "run"
    status = main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
                   "--weights", "none", "--epochs", "1", "--cpu-threads", "1", "--checkpointing-steps", "none"])
    assert status == 0
    model = ChestXrayClassifier.from_pretrained(out)
    assert model.class_names == CLASS_NAMES and model.config.image_size == 32
    assert 0.05 <= model.config.temperature <= 20.0  # fitted on the validation split
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1]
    assert not (out / "checkpoints").exists()  # --checkpointing-steps none
    probabilities = model.predict_proba([synthetic_xray(40, 40, seed=1), synthetic_xray(50, 40, seed=2, kind=1)])
    assert probabilities.shape == (2, 3) and torch.allclose(probabilities.sum(dim=1), torch.ones(2))
    # What the chosen epoch has not learned is recorded and shown on the card (after one epoch, usually something).
    record = json.loads((out / "train_config.json").read_text())
    by_source = json.loads((out / "val_metrics.json").read_text())["by_source"]
    expected = [f"{cls} in {source} (validation recall {r:.2f})" for source, row in by_source.items()
                for cls, r in row["recall"].items() if r < 0.5]
    assert record["unlearned_groups"] == expected
    card = (out / "README.md").read_text()
    assert ("This model has not learned every class" in card) == bool(expected)
    assert all(group in card for group in expected)
    # Synthetic films of one class differ only by their noise: to the hash, copies of one another.
    copies = record["val_copies_of_train"]
    assert copies["of"] == sum(record["data_counts"]["val"].values()) and copies["n"] == copies["of"]
    assert f"{copies['n']} of the {copies['of']} validation images are copies of a training image" in card
    # The run's split is rebuilt from its record alone (for probes and packaging after the run).
    rebuilt, sources = rebuild_split(record, model.preprocessor)
    assert rebuilt.val.counts(CLASS_NAMES) == record["data_counts"]["val"] and sources == [(data.name, data)]
    assert sorted(rebuilt.val.paths + rebuilt.train.paths) == sorted(p for p in data.rglob("*") if p.is_file())
    with pytest.raises(DatasetError, match="rebuilt val split does not match"):
        rebuild_split({**record, "data_counts": {**record["data_counts"], "val": {"Normal": 99}}}, model.preprocessor)


def test_validation_images_that_are_copies_of_training_images_are_counted_per_class():
    from chest_model.training import Split, TrainingData, validation_copies

    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 3, 48, 48), dtype=np.uint8))
    train = Split(noise[:5], [0, 1, 2, 0, 1], [0] * 5, ["s"], [0.0] * 5)
    brighter = (noise[3].int() * 3 // 4 + 40).to(torch.uint8)  # the same film, another exposure
    val = Split(torch.stack([noise[5], brighter, noise[6]]), [0, 0, 2], [0] * 3, ["s"], [0.0] * 3)
    assert validation_copies(TrainingData(train, val), CLASS_NAMES) == {"n": 1, "of": 3, "by_class": {"Normal": {"copies": 1, "n": 2}, "Viral Pneumonia": {"copies": 0, "n": 1}}}


def test_with_ema_decay_the_moving_average_is_validated_and_saved(tmp_path, clean_accelerate):
    from safetensors.torch import load_file

    data = make_class_folders(tmp_path / "data", per_class=5, size=40, seed=6)
    out = tmp_path / "run"
    status = main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
                   "--weights", "none", "--backbone", "vgg19_bn", "--epochs", "1", "--cpu-threads", "1", "--ema-decay", "0.9"])
    assert status == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["hyperparameters"]["ema_decay"] == 0.9
    (row,) = json.loads((out / "history.json").read_text())
    assert 0.0 <= row["raw_val_group_recall"] <= 1.0 and row["raw_val_loss"] != row["val_loss"]  # the raw weights, validated too
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    raw = load_file(str(checkpoint / "model.safetensors"))
    assert not list(checkpoint.glob("custom_checkpoint_*")), "accelerate loads these with weights_only=False"
    average = load_file(str(checkpoint / "ema.safetensors"))
    steps = -(-sum(record["data_counts"]["train"].values()) // 4)
    assert int(average["n_averaged"]) == steps  # updated once per optimizer step
    saved = load_file(str(out / "model.safetensors"))
    name = next(k for k in saved if k.endswith("weight") and saved[k].dim() == 4)  # a convolution
    assert torch.equal(saved[name], average[f"module.{name}"].to(saved[name].dtype))
    assert not torch.equal(saved[name], raw[name])  # not the last step's raw weights
    bn_mean = next(k for k in saved if k.endswith("running_mean"))
    assert torch.equal(saved[bn_mean], average[f"module.{bn_mean}"])  # BatchNorm statistics are averaged too


def test_a_finished_run_extended_with_more_epochs_keeps_its_best_epoch_and_finishes(tmp_path, clean_accelerate):
    """Resuming a finished run with a larger --epochs: when the new epochs are no better, the best
    epoch's saved model (which holds the fitted feature statistics) is the one finished again."""
    data = make_class_folders(tmp_path / "data", per_class=5, size=40, seed=6)
    out = tmp_path / "run"
    # lr 0 keeps the weights (VGG19 has no BatchNorm), so epoch 2 ties epoch 1 and epoch 1 stays best.
    common = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1", "--lr", "0"]
    assert main([*common, "--epochs", "1"]) == 0
    first = ChestXrayClassifier.from_pretrained(out).state_dict()
    assert any(k.startswith("ood_") for k in first)
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")  # as a first run with --test-dir leaves it
    assert main([*common, "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 0
    assert not (out / "eval").exists()  # it measured the weights before the resume
    record = json.loads((out / "train_config.json").read_text())
    assert record["best_epoch"] == 1
    # The record names the command that started the run, and the one that resumed it.
    assert "--epochs 1" in record["command"] and "--resume-from-checkpoint" not in record["command"]
    (resumed,) = record["resumed_with"]
    assert "--epochs 2 --resume-from-checkpoint latest" in resumed
    card = (out / "README.md").read_text()
    from chest_model.card import shareable_command

    assert f"`{shareable_command(record['command'])}`" in card and f"- Resumed with: `{shareable_command(resumed)}`" in card
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]
    again = ChestXrayClassifier.from_pretrained(out).state_dict()
    assert again.keys() == first.keys()
    assert all(torch.equal(first[k], again[k]) for k in first if not k.startswith("ood_"))


def test_an_earlier_runs_checkpoints_are_never_mixed_with_a_new_run(tmp_path, clean_accelerate, capsys, monkeypatch):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1", "--epochs", "1"]
    assert main(common) == 0
    (earlier,) = (out / "checkpoints").glob("step_*")
    capsys.readouterr()

    # A new run (no resume) into the same folder is refused before any work, with what to do.
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")  # a record of the earlier run's model
    (out / "chest-xray-classifier").mkdir()
    (out / "chest-xray-classifier" / "events.out.tfevents.1").write_text("")  # and its tracker log
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert earlier.name in err and "--resume-from-checkpoint latest" in err and "--overwrite-output-dir" in err
    # Resuming with settings that shape the weights is refused too, naming each one.
    assert main([*common[:-2], "--epochs", "2", "--image-size", "48", "--lr", "0.01", "--resume-from-checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 32 (now 48)" in err and "--lr 0.001 (now 0.01)" in err and "--epochs" not in err
    assert list((out / "checkpoints").glob("step_*")) == [earlier]
    # From another working folder, the same data given by a relative path still resumes.
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", "data", *common[2:-2], "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]

    # --overwrite-output-dir starts over, and the earlier checkpoints go.
    assert main([*common, "--overwrite-output-dir"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1]
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [earlier.name]  # epoch 2's is gone
    assert not (out / "eval").exists()  # and no record of the earlier model stays beside the new one
    assert not (out / "chest-xray-classifier").exists()
    # Both flags at once, or a checkpoint outside its own run's folder: refused, saying why.
    assert main([*common, "--overwrite-output-dir", "--resume-from-checkpoint", "latest"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main([*common[:2], "--output-dir", str(tmp_path / "elsewhere"), *common[4:],
                 "--resume-from-checkpoint", str(out / "checkpoints" / earlier.name)]) == 2
    assert f"its own run's folder (--output-dir {out})" in capsys.readouterr().err



def test_a_resume_that_would_be_refused_is_refused_before_decoding(tmp_path, clean_accelerate, capsys, caplog):
    caplog.set_level(logging.INFO, logger="chest_model.training")
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--output-dir", str(out), "--batch-size", "4", "--weights", "none", "--cpu-threads", "1"]
    assert main([*common, "--image-size", "32", "--epochs", "1"]) == 0
    decoded = lambda: [r for r in caplog.records if r.getMessage().startswith("decoded")]  # noqa: E731
    assert decoded()  # what the refusals below must come before
    weights = (out / "model.safetensors").read_bytes()
    caplog.clear()
    capsys.readouterr()
    assert main([*common, "--image-size", "48", "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 2
    assert "--image-size 32 (now 48)" in capsys.readouterr().err
    missing = out / "checkpoints" / "step_99999999"
    assert main([*common, "--image-size", "32", "--epochs", "2", "--resume-from-checkpoint", str(missing)]) == 2
    assert f"{missing}: no such checkpoint folder" in capsys.readouterr().err
    # A finished run without checkpoints (as --checkpointing-steps none leaves it): 'latest' would
    # have trained from scratch over its model.
    shutil.rmtree(out / "checkpoints")
    assert main([*common, "--image-size", "32", "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 2
    assert "holds a finished run but no checkpoint to continue from" in capsys.readouterr().err
    assert not decoded(), "a refusal came after decoding every image"
    assert (out / "model.safetensors").read_bytes() == weights

def test_a_mistyped_external_dir_stops_the_run_before_training(tmp_path, clean_accelerate, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    status = main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--weights", "none",
                   "--epochs", "1", "--external-dir", f"typo={tmp_path / 'nosuch'}"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nosuch'}: data folder does not exist" in err and "Traceback" not in err
    assert not out.exists()


def test_a_validation_folder_of_one_training_source_is_reported_as_that_source(tmp_path, clean_accelerate):
    train = make_class_folders(tmp_path / "mine", per_class=4, size=40, seed=6)
    val = make_class_folders(tmp_path / "val", per_class=2, size=40, seed=7)  # "val": a split folder's name
    out = tmp_path / "run"
    assert main(["--data-dir", str(train), "--val-dir", str(val), "--output-dir", str(out), "--image-size", "32",
                 "--weights", "none", "--epochs", "1", "--checkpointing-steps", "none"]) == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["sources"] == ["mine"] and list(record["data_counts_by_source"]["val"]) == ["mine"]


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_an_impossible_validation_share_is_refused_when_parsing(value, capsys):
    from chest_model.train_config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--data-dir", "d", "--output-dir", "o", "--val-split", value])
    assert "--val-split is the share of the training images held out" in capsys.readouterr().err


def test_framing_augmentation_trains_with_the_models_contrast_normalisation(tmp_path, clean_accelerate, monkeypatch):
    """--augment framing gets the run's preprocessor, so each crop is standardised as inference would."""
    from chest_model import preprocess

    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    calls = []
    original = preprocess.Preprocessor.normalize_contrast_tensor
    monkeypatch.setattr(preprocess.Preprocessor, "normalize_contrast_tensor",
                        lambda self, image: calls.append(self.config.contrast) or original(self, image))
    assert main(["--data-dir", str(data), "--output-dir", str(tmp_path / "run"), "--image-size", "32", "--weights", "none",
                 "--epochs", "1", "--augment", "framing", "--contrast", "standardize", "--num-workers", "0",
                 "--checkpointing-steps", "none"]) == 0
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert set(calls) == {"standardize"}
    assert len(calls) == sum(record["data_counts"]["train"].values())  # each training draw of the epoch, no validation image


def test_a_resume_with_fewer_epochs_than_trained_is_refused_before_decoding(tmp_path, clean_accelerate, capsys, caplog):
    # Else the loop has nothing to do, and the last epoch's weights would be saved as the best one's.
    caplog.set_level(logging.INFO, logger="chest_model.training")
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1"]
    assert main([*common, "--epochs", "2"]) == 0
    weights = (out / "model.safetensors").read_bytes()
    caplog.clear()
    capsys.readouterr()
    assert main([*common, "--epochs", "1", "--resume-from-checkpoint", "latest"]) == 2
    assert "has trained 2 epoch(s) (the last one whole); resume with --epochs 2 or more" in capsys.readouterr().err
    assert not [r for r in caplog.records if r.getMessage().startswith("decoded")]
    assert (out / "model.safetensors").read_bytes() == weights


def test_unreadable_files_that_were_a_whole_class_stop_the_run_naming_it(tmp_path, clean_accelerate, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    for path in (data / "Viral Pneumonia").iterdir():
        path.write_bytes(b"not an image")
    status = main(["--data-dir", str(data), "--output-dir", str(tmp_path / "run"), "--image-size", "32", "--weights", "none",
                   "--epochs", "1", "--skip-bad-files"])
    assert status == 2
    assert "no readable train image of class(es) ['Viral Pneumonia'] is left (4 unreadable file(s) left out)" in capsys.readouterr().err


def test_a_held_out_set_with_no_readable_file_is_refused_before_training(tmp_path, clean_accelerate, capsys, caplog):
    caplog.set_level(logging.INFO, logger="chest_model.training")
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    broken = tmp_path / "adults" / "Normal"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not an image")
    status = main(["--data-dir", str(data), "--output-dir", str(tmp_path / "run"), "--image-size", "32", "--weights", "none",
                   "--epochs", "1", "--external-dir", f"adults={broken.parent}"])
    assert status == 2
    assert "--external-dir adults: none of the 1 image files" in capsys.readouterr().err
    assert not [r for r in caplog.records if r.getMessage().startswith("epoch")]


def test_unreadable_test_files_are_listed_before_training_and_the_card_counts_what_was_evaluated(
        tmp_path, clean_accelerate, capsys, caplog):
    caplog.set_level(logging.INFO, logger="chest_model.training")
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    test = make_class_folders(tmp_path / "test", per_class=3, size=40, seed=7)
    (test / "Covid" / "zero.png").write_bytes(b"")
    (test / "Covid" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    common = ["--data-dir", str(data), "--test-dir", str(test), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--epochs", "1", "--cpu-threads", "1", "--checkpointing-steps", "none"]
    assert main([*common, "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "2 file(s) cannot be read" in err
    assert f"--test-dir {test}: Covid/zero.png: empty file" in err and f"--test-dir {test}: Covid/cut.jpg" in err
    assert not [r for r in caplog.records if r.getMessage().startswith("epoch")]  # found before training

    run = tmp_path / "run"
    assert main([*common, "--output-dir", str(run), "--skip-bad-files"]) == 0
    counts = json.loads((run / "train_config.json").read_text())["data_counts"]["test"]
    assert counts == {"Normal": 3, "Covid": 3, "Viral Pneumonia": 3}
    assert "| test | 3 | 3 | 3 | 9 |" in (run / "README.md").read_text()


def test_a_run_stopped_before_its_end_leaves_a_model_that_says_it_is_unfinished(tmp_path, clean_accelerate, monkeypatch, caplog):
    import chest_model.training as training
    from chest_model import ChestXrayClassifier

    best_after = []

    def stop_after_the_epochs(run, model, best_val):  # as Ctrl-C between the last epoch and calibration
        best_after.append(run.state["best"]["epoch"])
        raise KeyboardInterrupt

    original = training.calibrate_chosen
    monkeypatch.setattr(training, "calibrate_chosen", stop_after_the_epochs)
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    run = tmp_path / "run"
    assert main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "32", "--batch-size", "4",
                 "--weights", "none", "--epochs", "3", "--cpu-threads", "1", "--checkpointing-steps", "none"]) == 130
    assert best_after[0] < 3, "the last epoch was the best: no mid-run save to look at (change the seed)"
    card = (run / "README.md").read_text()
    assert "**Unfinished training run.** These weights were saved after epoch" in card
    caplog.set_level(logging.WARNING, logger="chest_model.hub")
    ChestXrayClassifier.from_pretrained(run)
    assert any("an unfinished training run" in r.getMessage() for r in caplog.records)

    # The same run, not stopped: its mid-run save (the best epoch was not the last) gives way to the
    # finished model, and nothing along the way calls the run unfinished.
    monkeypatch.setattr(training, "calibrate_chosen", original)
    caplog.clear()
    finished = tmp_path / "finished"
    assert main(["--data-dir", str(data), "--output-dir", str(finished), "--image-size", "32", "--batch-size", "4",
                 "--weights", "none", "--epochs", "3", "--cpu-threads", "1", "--checkpointing-steps", "none"]) == 0
    assert json.loads((finished / "train_config.json").read_text())["best_epoch"] == best_after[0] < 3
    assert "Unfinished training run" not in (finished / "README.md").read_text()
    assert not any("unfinished" in r.getMessage() for r in caplog.records)


def test_a_held_out_folder_that_is_training_data_is_refused_before_anything_is_decoded(tmp_path, clean_accelerate, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    adults = make_class_folders(tmp_path / "data" / "Normal" / "adults", per_class=2, size=40, seed=7, class_names=["Normal"])
    status = main(["--data-dir", str(data), "--val-dir", str(data), "--test-dir", f"{data}/../data",
                   "--external-dir", f"inside={adults.parent}", "--output-dir", str(tmp_path / "run"),
                   "--image-size", "32", "--weights", "none", "--epochs", "1"])
    assert status == 2
    err = capsys.readouterr().err
    for flag in ("--val-dir", "--test-dir", "--external-dir inside"):
        assert f"{flag} " in err and "shares files with the training data 'data'" in err, flag
    assert err.count("shares files with the training data") == 3
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_one_film_filed_under_two_classes_is_named_with_both_files(tmp_path, clean_accelerate, caplog):
    import cv2

    caplog.set_level(logging.WARNING, logger="chest_model.training")
    data, rng = tmp_path / "data", np.random.default_rng(0)
    for name in ("Normal", "Covid", "Viral Pneumonia"):  # films unlike each other at low frequencies, as real ones are
        (data / name).mkdir(parents=True)
        for i in range(6):
            film = cv2.GaussianBlur(rng.random((64, 64)), (0, 0), 4)
            cv2.imwrite(str(data / name / f"{i}.png"), np.uint8(255 * (film - film.min()) / np.ptp(film)))
    normal = sorted((data / "Normal").iterdir())[:2]
    for i, film in enumerate(normal):
        shutil.copy(film, data / "Covid" / f"copy{i}{film.suffix}")
    run = tmp_path / "run"
    assert main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "64", "--batch-size", "4",
                 "--weights", "none", "--epochs", "1", "--cpu-threads", "1", "--checkpointing-steps", "none"]) == 0
    conflicts = json.loads((run / "train_config.json").read_text())["label_conflicts"]
    assert sorted(tuple(sorted(c["files"])) for c in conflicts) == sorted(
        tuple(sorted([f"data/Normal/{film.name}", f"data/Covid/copy{i}{film.suffix}"])) for i, film in enumerate(normal))
    assert all(sorted(c["classes"]) == ["Covid", "Normal"] for c in conflicts)
    warning = next(r.getMessage() for r in caplog.records if "filed under two classes" in r.getMessage())
    assert warning.startswith("2 pair(s) of images in the training folders look like one film (the copies audit's hash) "
                              "filed under two classes: check their labels")
    assert f"data/Covid/copy0{normal[0].suffix} (Covid)" in warning


def test_a_resumed_auto_run_keeps_the_precision_its_checkpoint_was_trained_in(tmp_path, clean_accelerate, monkeypatch, caplog):
    import chest_model.training as training
    from chest_model.precision import PrecisionChoice

    caplog.set_level(logging.INFO, logger="chest_model.training")
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    common = ["--data-dir", str(data), "--output-dir", str(tmp_path / "run"), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1"]
    monkeypatch.setattr(training, "choose_precision", lambda device, requested: PrecisionChoice("fp32", "timed: fp32", False))
    assert main([*common, "--epochs", "1"]) == 0

    def timed_the_other_way(device, requested):  # a busy machine timing the matmul differently
        raise AssertionError("a resumed run must not time the precision again")

    monkeypatch.setattr(training, "choose_precision", timed_the_other_way)
    caplog.clear()
    assert main([*common, "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 0
    assert any("auto: fp32, as the checkpoint being resumed was trained" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["mixed_precision"] == "no"


def test_a_broken_link_among_the_training_images_is_named_like_any_unreadable_file(tmp_path, clean_accelerate, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    (data / "Normal" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    common = ["--data-dir", str(data), "--image-size", "32", "--batch-size", "4", "--weights", "none", "--epochs", "1",
              "--cpu-threads", "1", "--checkpointing-steps", "none"]
    assert main([*common, "--output-dir", str(tmp_path / "refused")]) == 2
    assert "gone.png: no such file (a symbolic link to a file that is not there)" in capsys.readouterr().err
    assert main([*common, "--output-dir", str(tmp_path / "run"), "--skip-bad-files"]) == 0


def test_a_resume_from_an_older_checkpoint_sets_the_abandoned_later_ones_aside(tmp_path, clean_accelerate, caplog):
    from chest_model.checkpoints import list_checkpoints

    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1", "--epochs", "3", "--checkpointing-steps", "epoch",
              "--checkpoints-total-limit", "5"]
    assert main(common) == 0
    first, second, third = list_checkpoints(out / "checkpoints")
    caplog.set_level(logging.WARNING, logger="chest_model.training")
    assert main([*common, "--resume-from-checkpoint", str(first)]) == 0
    # the later checkpoints of the abandoned timeline are kept, aside; 'latest' is this run's own
    assert sorted(p.name for p in (out / "checkpoints" / "superseded").iterdir()) == [second.name, third.name]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [first.name, second.name, third.name]
    assert sum("set aside, so that 'latest' means this run's own" in r.getMessage() for r in caplog.records) == 2


def test_a_resume_names_a_changed_metadata_csv(tmp_path, clean_accelerate, capsys):
    kids = make_class_folders(tmp_path / "kids", per_class=4, size=40, seed=6)
    adults = make_class_folders(tmp_path / "adults", per_class=6, size=40, seed=7, class_names=["Normal"])
    manifest = tmp_path / "manifest.csv"
    films = sorted(p.name for p in (adults / "Normal").iterdir())
    manifest.write_text("file,view\n" + "".join(f"adults/Normal/{f},{'AP' if i % 2 else 'PA'}\n" for i, f in enumerate(films)))
    common = ["--data-dir", f"kids={kids}", "--data-dir", f"adults={adults}", "--output-dir", str(tmp_path / "run"),
              "--image-size", "32", "--batch-size", "4", "--weights", "none", "--cpu-threads", "1",
              "--sampling", "within-source", "--balance-by", "view", "--metadata", str(manifest)]
    assert main([*common, "--epochs", "1"]) == 0
    manifest.write_text(manifest.read_text().replace(",AP", ",PA"))  # every film PA now: other draws
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 2
    assert "--metadata: the CSVs' contents changed" in capsys.readouterr().err


def test_overwrite_keeps_the_earlier_run_when_the_new_command_has_a_data_mistake(tmp_path, clean_accelerate, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--image-size", "32", "--batch-size", "4", "--weights", "none", "--epochs", "1"]
    assert main(["--data-dir", str(data), *common]) == 0
    weights = (out / "model.safetensors").read_bytes()
    broken = tmp_path / "held-out" / "Normal"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not an image")
    assert main(["--data-dir", str(data), *common, "--overwrite-output-dir", "--external-dir", f"x={broken.parent}"]) == 2
    assert "none of the 1 image files" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights and (out / "history.json").is_file()


def test_a_resume_on_other_files_is_refused_before_they_leak_into_validation(tmp_path, clean_accelerate, capsys, caplog):
    caplog.set_level(logging.INFO, logger="chest_model.training")
    data = make_class_folders(tmp_path / "data", per_class=5, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1"]
    assert main([*common, "--epochs", "1"]) == 0
    added = write_image(data / "Normal" / "added.png", synthetic_xray(40, 40, seed=99))
    capsys.readouterr()
    caplog.clear()
    assert main([*common, "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "no longer hold the files this checkpoint trained on (--data-dir: 15 files, now 16)" in err
    assert "redraw the validation split" in err
    assert not [r for r in caplog.records if r.getMessage().startswith("decoded")]  # refused before decoding
    added.unlink()  # the files as they were: the run goes on
    assert main([*common, "--epochs", "2", "--resume-from-checkpoint", "latest"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]


def test_a_signal_after_the_last_epoch_stops_before_the_final_work_and_a_resume_finishes(tmp_path, clean_accelerate, monkeypatch):
    import os
    import signal

    from chest_model import training

    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=6)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
              "--weights", "none", "--cpu-threads", "1", "--epochs", "1"]
    checkpoint = training.checkpoint

    def checkpoint_then_signal(run, epoch, step_in_epoch, epoch_so_far=None):
        checkpoint(run, epoch, step_in_epoch, epoch_so_far)
        if epoch == run.args.epochs:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the last epoch's checkpoint is written

    monkeypatch.setattr(training, "checkpoint", checkpoint_then_signal)
    assert main(common) == 128 + signal.SIGTERM
    assert not (out / "history.json").exists() and not (out / "model.safetensors").exists()  # no final work
    monkeypatch.setattr(training, "checkpoint", checkpoint)
    assert main([*common, "--resume-from-checkpoint", "latest"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1]
    assert ChestXrayClassifier.from_pretrained(out).config.feature_threshold > 0


def test_with_grad_accum_checkpoints_fall_on_accumulation_boundaries(tmp_path, clean_accelerate):
    from chest_model.checkpoints import verify_checkpoint

    data = make_class_folders(tmp_path / "data", per_class=5, size=40, seed=6)
    out = tmp_path / "run"
    assert main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "2",
                 "--weights", "none", "--cpu-threads", "1", "--epochs", "1", "--grad-accum", "2",
                 "--checkpointing-steps", "1", "--checkpoints-total-limit", "0"]) == 0
    steps = [verify_checkpoint(p, checksums=False)["step_in_epoch"] for p in (out / "checkpoints").glob("step_*")]
    mid_epoch = [s for s in steps if s]
    assert len(mid_epoch) >= 2 and all(s % 2 == 0 for s in mid_epoch)  # never between two accumulated batches
    # Every 3 batches with boundaries every 2: at the first boundary after each multiple of 3, none skipped.
    batches = -(-sum(json.loads((out / "train_config.json").read_text())["data_counts"]["train"].values()) // 2)
    assert main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "2",
                 "--weights", "none", "--cpu-threads", "1", "--epochs", "1", "--grad-accum", "2",
                 "--checkpointing-steps", "3", "--checkpoints-total-limit", "0", "--overwrite-output-dir"]) == 0
    steps = sorted(s for s in (verify_checkpoint(p, checksums=False)["step_in_epoch"]
                               for p in (out / "checkpoints").glob("step_*")) if s)
    expected = [b for b in range(4, batches, 6)]  # multiples of 3 (3, 9, ...) reached at even boundaries 4, 10, ...
    expected += [b for b in range(6, batches, 6)]  # 6, 12, ... are boundaries themselves
    assert steps == sorted(expected) and steps
