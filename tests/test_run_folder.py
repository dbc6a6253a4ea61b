"""The output folder's policy, decided before any decoding: one run per folder, continued or cleared on request."""
from chest_model.run_folder import TRACKER_PROJECT, clear_earlier_run, output_dir_problem
from chest_model.train_config import parse_config


def config(out, *extra):
    return parse_config(["--data-dir", "unused", "--output-dir", str(out), *extra])


def test_an_empty_or_missing_folder_is_fine(tmp_path):
    assert output_dir_problem(config(tmp_path / "new")) is None
    (tmp_path / "empty").mkdir()
    assert output_dir_problem(config(tmp_path / "empty")) is None


def test_an_earlier_model_is_refused_naming_both_ways_on(tmp_path):
    from chest_model import ChestXrayConfig

    ChestXrayConfig(image_size=32).save(tmp_path / "config.json")  # a run's best epoch so far, saved
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    problem = output_dir_problem(config(tmp_path))
    assert "model.safetensors" in problem and "--resume-from-checkpoint latest" in problem
    assert "--overwrite-output-dir" in problem
    assert output_dir_problem(config(tmp_path, "--overwrite-output-dir")) is None


def test_resume_and_overwrite_together_are_refused(tmp_path):
    problem = output_dir_problem(config(tmp_path, "--overwrite-output-dir", "--resume-from-checkpoint", "latest"))
    assert "give one of them" in problem


def test_a_checkpoint_outside_its_runs_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "other" / "checkpoints" / "step_00000004"
    elsewhere.mkdir(parents=True)
    problem = output_dir_problem(config(tmp_path / "run", "--resume-from-checkpoint", str(elsewhere)))
    assert "its own run's folder" in problem and str(tmp_path / "other") in problem


def test_latest_on_a_finished_run_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "history.json").write_text("[]")
    problem = output_dir_problem(config(tmp_path, "--resume-from-checkpoint", "latest"))
    assert "no checkpoint to continue from" in problem
    # A fresh folder with 'latest' simply starts from scratch.
    assert output_dir_problem(config(tmp_path / "fresh", "--resume-from-checkpoint", "latest")) is None


def test_clearing_removes_the_earlier_run_and_nothing_else(tmp_path):
    for name in ("model.safetensors", "config.json", "history.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / TRACKER_PROJECT).mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file")
    clear_earlier_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_files_of_someone_elses_making_are_never_offered_for_deletion(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # another library's model
    (tmp_path / "README.md").write_text("their card")
    (tmp_path / "model.safetensors").write_bytes(b"their weights")
    for extra in ((), ("--overwrite-output-dir",)):
        problem = output_dir_problem(config(tmp_path, *extra))
        assert "not a chest X-ray model's or a training run's" in problem and "--overwrite-output-dir" not in problem
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("unrelated files alone are fine")
    assert output_dir_problem(config(tmp_path / "other")) is None


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "run").write_text("a file")
    assert "is a file" in output_dir_problem(config(tmp_path / "run"))
    assert "is a file, so no folder can be made below it" in output_dir_problem(config(tmp_path / "run" / "below"))


def test_latest_over_an_unfinished_run_without_checkpoints_is_refused(tmp_path):
    from chest_model import ChestXrayConfig

    # A run stopped before its first checkpoint, after saving its best epoch so far: 'latest' would
    # start from scratch over it, with whatever settings the new command gives.
    ChestXrayConfig(image_size=32).save(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    problem = output_dir_problem(config(tmp_path, "--resume-from-checkpoint", "latest"))
    assert "holds an earlier run (model.safetensors) but no checkpoint" in problem and "--overwrite-output-dir" in problem


def test_the_run_folder_or_its_checkpoints_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for wrong in (tmp_path, tmp_path / "checkpoints"):
        problem = output_dir_problem(config(tmp_path, "--resume-from-checkpoint", str(wrong)))
        assert problem.startswith(f"{wrong}: not a checkpoint folder") and "step_NNNNNNNN" in problem


def test_a_second_run_into_a_folder_a_run_is_writing_stops_before_it_deletes_anything(tmp_path, monkeypatch):
    """The same command started twice, the second with --overwrite-output-dir: without the lock it would
    delete the first run's checkpoints while that run writes them."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import ROOT, make_class_folders

    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)  # the first run's, as it writes them
    (out / "history.json").write_text("[]")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from chest_model.run_folder import lock_output_dir; "
                               f"lock = lock_output_dir(Path({str(out)!r})); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        data = make_class_folders(tmp_path / "data", per_class=4, size=32)
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(data), "--output-dir",
                                 str(tmp_path / "." / "run"), "--overwrite-output-dir", "--image-size", "32",
                                 "--weights", "none", "--epochs", "1"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another training run (pid {holder.pid}) is writing to it" in second.stderr and str(tmp_path) in second.stderr
        assert (out / "checkpoints" / "step_00000004").is_dir() and (out / "history.json").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # A killed run leaves no stale lock: the kernel released it with the process.
    import tempfile

    from chest_model.run_folder import lock_output_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    lock = lock_output_dir(out)
    assert lock is not None
    lock.close()
