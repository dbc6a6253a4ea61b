"""End-to-end training runs through the real train.py, in subprocesses (accelerate's state is global)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chest_model import ChestXrayClassifier
from helpers import CLASS_NAMES, EXAMPLES, ROOT, make_class_folders, write_image, synthetic_xray

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TINY = ["--image-size", "32", "--batch-size", "4", "--weights", "none", "--seed", "3", "--cpu-threads", "1"]


def env(**extra):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def train(*args, launcher=None, check=True, timeout=300, extra_env=None):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(**(extra_env or {})), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_class_folders(root / "train", per_class=7, size=48, seed=1)
    make_class_folders(root / "val", per_class=3, size=48, seed=2)
    make_class_folders(root / "test", per_class=3, size=48, seed=3)
    # A few real, downscaled X-rays in the mix.
    for name, example in zip(CLASS_NAMES, ["normal", "covid", "viral-pneumonia"]):
        shutil.copy(EXAMPLES / f"{example}.jpeg", root / "test" / name / f"real_{example}.JPEG")
    return root


def test_outputs_of_a_run_with_a_test_dir(data, tmp_path):
    out = tmp_path / "run"
    result = train("--data-dir", str(data / "train"), "--test-dir", str(data / "test"), "--output-dir", str(out),
                   "--epochs", "2", *TINY)
    log = result.stderr + result.stdout
    for name in ["config.json", "model.safetensors", "README.md", "history.json", "training_curves.png", "val_metrics.json",
                 "train_config.json", "eval/metrics.json", "eval/confusion_matrix.png"]:
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) or all("checkpoints" in str(p) for p in out.rglob("*.bin"))
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert log.count("epoch 1/2 | train loss") == 1 and "macro-F1" in log and "img/s" in log
    record = json.loads((out / "train_config.json").read_text())
    assert record["world_size"] == 1 and record["device"] == "cpu"
    # --val-split 0.15 of 21 images, stratified: 1 per class at least, never a test image.
    assert sum(record["data_counts"]["val"].values()) == 4 and sum(record["data_counts"]["train"].values()) == 17
    assert sum(record["data_counts"]["test"].values()) == 12
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "n"):
        assert key in metrics
    assert metrics["n"] == 12 and sum(map(sum, metrics["confusion_matrix"])) == 12
    # Copies of test images are sought among the 17 images the model trained on, not its validation ones.
    copies = metrics["audit"]["train_copies"]
    assert copies["searched"] == "the training split" and copies["n_train"] == 17 and copies["of"] == 12
    assert copies["pairs"] and all(pair["train_file"].startswith(record["sources"][0] + "/") for pair in copies["pairs"])  # SOURCE/CLASS/FILE
    card = (out / "README.md").read_text()
    from chest_model.card import shareable_command

    # the card shows the recorded command, its absolute paths shortened (train_config.json keeps them)
    assert shareable_command(record["command"]) in card and str(out) not in card and str(data) not in card
    assert f"{metrics['accuracy']:.3f}" in card
    assert "| test | 4 | 4 | 4 | 12 |" in card
    model = ChestXrayClassifier.from_pretrained(out)
    assert model.config.image_size == 32 and model.config.temperature == pytest.approx(record["temperature"])
    assert (out / "checkpoints").is_dir() and len(list((out / "checkpoints").glob("step_*"))) == 2


def test_two_processes_on_cpu_count_every_validation_sample_once(data, tmp_path):
    out = tmp_path / "ddp"
    # 21 train images, 9 val images: neither splits evenly over 2 processes x batch 4. A seeded sampler,
    # as the starter recipe uses, must be sharded the same way.
    train("--data-dir", str(data / "train"), "--val-dir", str(data / "val"), "--test-dir", str(data / "test"),
          "--output-dir", str(out), "--epochs", "1", "--sampling", "within-source", *TINY,
          launcher=[ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"])
    record = json.loads((out / "train_config.json").read_text())
    assert record["world_size"] == 2 and record["device"] == "cpu"
    assert record["command"].startswith("accelerate launch --multi_gpu --num_processes 2 train.py --data-dir ")
    assert record["hyperparameters"]["global_batch_size"] == 8
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 12
    card = (out / "README.md").read_text()
    assert "on 9 images" in card  # validation: exactly the 9 files, no padding duplicates
    # training figures too: the last global batch's repeats are not counted (21 images, global batch 8)
    assert [row["train_images"] for row in json.loads((out / "history.json").read_text())] == [sum(record["data_counts"]["train"].values())]


def test_sync_bn_over_cpu_processes_is_refused_before_any_work(data, tmp_path):
    out = tmp_path / "run"
    result = train("--data-dir", str(data / "train"), "--output-dir", str(out), "--epochs", "1", "--backbone", "vgg19_bn",
                   "--sync-bn", *TINY, check=False,
                   launcher=[ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534"])
    assert result.returncode != 0
    assert "error: --sync-bn needs CUDA GPUs (torch's SyncBatchNorm); these 2 processes run on cpu" in result.stderr
    assert not out.exists()


def _weights(path):
    return load_file(str(path))


def _same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_kill_9_after_a_checkpoint_then_resume_gives_identical_weights(data, tmp_path):
    # With a moving average of the weights, which the checkpoints must carry too.
    # One precision for both runs: `auto` times a matmul, and on a busy machine two runs can time it apart.
    args = ["--data-dir", str(data / "train"), "--epochs", "3", "--checkpointing-steps", "3", "--checkpoints-total-limit", "10",
            "--ema-decay", "0.5", "--mixed-precision", "no", *TINY]
    reference = tmp_path / "reference"
    train(*args, "--output-dir", str(reference))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--output-dir", str(out)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any((p / "manifest.json").exists() for p in (out / "checkpoints").glob("step_*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((out / "checkpoints").glob("step_*")), "no checkpoint was written before the kill"
    assert not (out / "history.json").exists(), "the run was killed before it finished"
    train(*args, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    assert _same(_weights(reference / "model.safetensors"), _weights(out / "model.safetensors"))
    last = sorted((reference / "checkpoints").glob("step_*"))[-1].name
    assert _same(_weights(reference / "checkpoints" / last / "model.safetensors"), _weights(out / "checkpoints" / last / "model.safetensors"))
    assert json.loads((reference / "history.json").read_text())[-1]["val_loss"] == json.loads((out / "history.json").read_text())[-1]["val_loss"]
    # The epoch the kill cut in two is recorded whole: its loss and accuracy cover the batches before the resume too.
    for whole, resumed in zip(json.loads((reference / "history.json").read_text()), json.loads((out / "history.json").read_text())):
        assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-9)
        assert resumed["train_accuracy"] == whole["train_accuracy"]


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(data, tmp_path):
    out = tmp_path / "term"
    args = ["--data-dir", str(data / "train"), "--epochs", "50", "--checkpointing-steps", "none", *TINY, "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "model.safetensors").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "SIGTERM received" in output
    (checkpoint,) = list((out / "checkpoints").glob("step_*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    resumed = train(*args[:-4], "--epochs", str(state["epoch"] + 1), "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert len(json.loads((out / "history.json").read_text())) == state["epoch"] + 1


def test_bad_data_is_reported_file_by_file_before_training(tmp_path):
    root = make_class_folders(tmp_path / "train", per_class=3, size=48)
    shutil.rmtree(root / "Viral Pneumonia")
    (root / "Pneumonia").mkdir()
    write_image(root / "Pneumonia" / "a.png", synthetic_xray(48, 48))
    (root / "Covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    for p in (root / "Normal").iterdir():
        p.unlink()
    result = train("--data-dir", str(root), "--output-dir", str(tmp_path / "out"), *TINY, check=False)
    assert result.returncode != 0
    err = result.stderr
    assert "'Pneumonia'" in err and "Viral Pneumonia: missing class folder" in err and "Normal: no image files" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()

    shutil.rmtree(root / "Pneumonia")
    make_class_folders(tmp_path / "fix", per_class=3, size=48)
    shutil.copytree(tmp_path / "fix" / "Viral Pneumonia", root / "Viral Pneumonia")
    shutil.copytree(tmp_path / "fix" / "Normal", root / "Normal", dirs_exist_ok=True)
    result = train("--data-dir", str(root), "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1", check=False)
    assert result.returncode != 0 and "broken.png" in result.stderr and "--skip-bad-files" in result.stderr
    result = train("--data-dir", str(root), "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1", "--skip-bad-files",
                   "--checkpointing-steps", "none")
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert any("broken.png" in s for s in json.loads((tmp_path / "out" / "train_config.json").read_text())["skipped_files"])


def test_non_finite_loss_stops_without_saving(data, tmp_path):
    out = tmp_path / "nan"
    result = train("--data-dir", str(data / "train"), "--output-dir", str(out), "--epochs", "2", *TINY, "--lr", "1e30", check=False)
    assert result.returncode != 0
    assert result.returncode == 2 and "error: " in result.stderr and "loss became" in result.stderr
    assert "Traceback" not in result.stderr  # a message, not a crash
    assert not (out / "model.safetensors").exists()


def test_imagenet_weights_offline_fail_fast_with_advice(data, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(data / "train"), "--output-dir", str(tmp_path / "o"),
                             "--image-size", "32"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**env(), "TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode != 0
    assert "vgg19-dcbb9e9d.pth" in result.stderr and "--weights none" in result.stderr


def test_a_learnable_synthetic_task_is_learned(tmp_path):
    root = make_class_folders(tmp_path / "train", per_class=16, size=48, seed=5)
    make_class_folders(tmp_path / "val", per_class=6, size=48, seed=6)
    out = tmp_path / "learn"
    train("--data-dir", str(root), "--val-dir", str(tmp_path / "val"), "--output-dir", str(out), "--epochs", "8",
          "--backbone", "vgg19_bn", "--lr", "0.005", "--batch-size", "8", "--image-size", "32", "--weights", "none",
          "--no-augment", "--checkpointing-steps", "none")
    best = max(row["val_accuracy"] for row in json.loads((out / "history.json").read_text()))
    assert best >= 0.8, f"chance is 0.33, best validation accuracy was {best}"


def test_two_sources_are_merged_split_by_source_and_reported_per_source(tmp_path):
    kids = make_class_folders(tmp_path / "kids" / "train", per_class=8, size=48, seed=11)
    adults = make_class_folders(tmp_path / "adults", per_class=10, size=48, seed=12)
    external = make_class_folders(tmp_path / "elsewhere", per_class=4, size=48, seed=13)
    for root in (adults, external):
        for name in ("Covid", "Viral Pneumonia"):
            shutil.rmtree(root / name)
    out = tmp_path / "multi"
    result = train("--data-dir", str(kids), "--data-dir", f"adult-normals={adults}", "--external-dir", f"elsewhere={external}",
                   "--output-dir", str(out), "--epochs", "2", "--sampling", "within-source", "--augment", "acquisition",
                   "--checkpointing-steps", "none", *TINY)
    assert "by source: kids" in result.stderr and "adult-normals" in result.stderr
    record = json.loads((out / "train_config.json").read_text())
    assert record["sources"] == ["kids", "adult-normals"] and record["selection_metric"] == "group_recall"
    # the kids' three classes 1:1:1, the single-class adult normals one more Normal group
    assert record["sampled_class_prior"] == pytest.approx({"Normal": 0.5, "Covid": 0.25, "Viral Pneumonia": 0.25})
    assert record["command"].startswith("python train.py --data-dir ")
    by_source = record["data_counts_by_source"]
    assert by_source["val"]["adult-normals"]["Normal"] >= 1 and by_source["val"]["kids"]["Covid"] >= 1
    assert by_source["train"]["adult-normals"] == {"Normal": by_source["train"]["adult-normals"]["Normal"], "Covid": 0, "Viral Pneumonia": 0}
    assert sum(by_source["train"]["kids"].values()) + sum(by_source["val"]["kids"].values()) == 24
    history = json.loads((out / "history.json").read_text())
    assert set(history[-1]["val_by_source"]) == {"kids", "adult-normals"} and 0 <= history[-1]["val_group_recall"] <= 1
    external_metrics = json.loads((out / "eval" / "external.json").read_text())["elsewhere"]
    assert external_metrics["n"] == 4 and external_metrics["true_counts"] == {"Normal": 4}
    assert sum(external_metrics["predicted_share"].values()) == pytest.approx(1)
    card = (out / "README.md").read_text()
    assert "External validation" in card and "| train | adult-normals | " in card and "children only" in card
    # Is the external set unseen? Its images are compared with those the model trained on.
    copies = external_metrics["train_copies"]
    assert copies["searched"] == "the training split" and copies["n_train"] == sum(record["data_counts"]["train"].values())
    assert ("**Not unseen:**" in card) == (copies["n"] > 0)
    model = ChestXrayClassifier.from_pretrained(out)
    # 2% where validation holds enough images to bound that rate; else the rate its size bounds (feature_ood.bounded_rate)
    n_val = sum(record["data_counts"]["val"].values())
    assert model.config.feature_threshold > 0 and model.config.feature_fpr == pytest.approx(max(0.02, 1 / (n_val + 1)))


def _kids_and_adult_normals(tmp_path):
    kids = make_class_folders(tmp_path / "kids" / "train", per_class=8, size=48, seed=11)
    adults = make_class_folders(tmp_path / "adults", per_class=12, size=48, seed=12)
    for name in ("Covid", "Viral Pneumonia"):
        shutil.rmtree(adults / name)
    return kids, adults


def test_balance_by_a_manifest_column_draws_each_view_of_a_group_equally(tmp_path):
    kids, adults = _kids_and_adult_normals(tmp_path)
    # A dataset's manifest: paths from above its root, a view per film, other columns beside it.
    files = sorted(p.name for p in (adults / "Normal").iterdir())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,view,age\n" + "".join(f"adults/Normal/{name},{'AP' if i < 3 else 'PA'},40\n"
                                                     for i, name in enumerate(files[:-1])))
    out = tmp_path / "run"
    result = train("--data-dir", f"kids={kids}", "--data-dir", f"adult-normals={adults}", "--output-dir", str(out),
                   "--epochs", "1", "--sampling", "within-source", "--balance-by", "view", "--metadata", str(manifest),
                   "--checkpointing-steps", "none", *TINY)
    record = json.loads((out / "train_config.json").read_text())
    strata = record["sampling_strata"]
    assert strata["column"] == "view" and record["hyperparameters"]["balance_by"] == "view"
    adult_views = strata["images"]["adult-normals / Normal"]
    # the file the manifest leaves out is a value of its own, and the log says so
    assert set(adult_views) == {"AP", "PA", "(not in the CSV)"} and sum(adult_views.values()) == record["data_counts_by_source"]["train"]["adult-normals"]["Normal"]
    assert strata["images"]["kids / Covid"] == {"(not in the CSV)": record["data_counts_by_source"]["train"]["kids"]["Covid"]}
    # what the sampler draws: the adult normals keep one group's quarter, split in three equal parts
    drawn = strata["draw_share"]["adult-normals / Normal"]
    assert drawn == pytest.approx({"AP": 1 / 12, "PA": 1 / 12, "(not in the CSV)": 1 / 12})
    assert strata["draw_share"]["kids / Covid"] == pytest.approx({"(not in the CSV)": 1 / 4})
    assert "sampling: adult-normals / Normal drawn equally by view: (not in the CSV) (" in result.stderr
    assert f"adult-normals / Normal: 1 of its {sum(adult_views.values())} training images are not in {manifest}" in result.stderr
    assert "--balance-by view --metadata" in record["command"]
    card = (out / "README.md").read_text()
    assert f"Drawn equally by `view` inside each sampling group (training images per value): adult-normals / Normal: AP {adult_views['AP']}, PA {adult_views['PA']}, (not in the CSV) 1\n" in card


@pytest.mark.parametrize("csv_text, says", [
    ("file,sex\nadults/Normal/img_000.png,F\n", "no column 'view'"),
    ("file,view\nsomewhere/else.png,AP\n", "--balance-by view: none of the"),
])
def test_a_metadata_csv_that_cannot_balance_stops_the_run_and_names_the_csv(tmp_path, csv_text, says):
    kids, adults = _kids_and_adult_normals(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(csv_text)
    out = tmp_path / "run"
    result = train("--data-dir", f"kids={kids}", "--data-dir", f"adult-normals={adults}", "--output-dir", str(out),
                   "--epochs", "1", "--sampling", "within-source", "--balance-by", "view", "--metadata", str(manifest),
                   *TINY, check=False)
    assert result.returncode != 0
    assert says in result.stderr and str(manifest) in result.stderr
    assert not (out / "model.safetensors").exists()


def test_precision_is_chosen_for_the_machine_and_tensorboard_gets_steps_epochs_and_figures(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from chest_model.precision import choose_precision

    out = tmp_path / "tb"
    result = train("--data-dir", str(data / "train"), "--test-dir", str(data / "test"), "--output-dir", str(out),
                   "--epochs", "2", "--report-to", "tensorboard", *TINY)
    expected = choose_precision("cpu")  # nothing asked for: the fast precision of this CPU
    record = json.loads((out / "train_config.json").read_text())
    assert record["mixed_precision"] == expected.mixed_precision and record["precision_reason"] == expected.reason
    assert f"precision: {expected.precision} ({expected.reason})" in result.stderr + result.stdout
    assert record["cpu_capability"] in expected.reason
    assert record["memory_format"] == ("channels_last" if expected.precision == "bf16" else "contiguous")

    events = list(out.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out}"
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = accumulator.Tags()["scalars"], accumulator.Tags()["images"]
    steps_per_epoch = -(-sum(record["data_counts"]["train"].values()) // 4)
    assert len(accumulator.Scalars("train/loss")) == 2 * steps_per_epoch  # every step of both epochs
    assert {"train/lr", "epoch/val_accuracy", "epoch/val_macro_f1", "epoch/train_loss"} <= set(scalars)
    assert [e.step for e in accumulator.Scalars("epoch/val_loss")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert {"figures/training_curves", "figures/confusion_matrix"} <= set(images)


def test_bf16_asked_for_runs_as_asked_with_a_warning_where_it_is_slow(data, tmp_path):
    from chest_model.precision import choose_precision

    out = tmp_path / "bf16"
    result = train("--data-dir", str(data / "train"), "--output-dir", str(out), "--epochs", "1", *TINY,
                   extra_env={"ACCELERATE_MIXED_PRECISION": "bf16"})  # what `accelerate launch --mixed_precision bf16` sets
    record = json.loads((out / "train_config.json").read_text())
    assert record["mixed_precision"] == "bf16" and record["precision_reason"].startswith("asked for bf16")
    warned = "it will run slower than fp32 here" in result.stderr
    assert warned == (not choose_precision("cpu").bf16_fast)
