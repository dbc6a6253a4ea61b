"""The `chest-model` commands: `predict` as a real subprocess through both entry points, and how every
command reports an error (one `error:` line, exit 2, no traceback)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

import chest_model
from chest_model.cli import main
from corpus import dicom_bytes
from helpers import EXAMPLES, ROOT, synthetic_xray, write_image


@pytest.fixture
def saved_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def run(*args):
    return subprocess.run([sys.executable, "-m", "chest_model", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_predict_json_reports_each_file_and_fails_for_bad_ones(saved_model, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    files = [str(p) for p in sorted(EXAMPLES.glob("*.jpeg"))]
    result = run("predict", "--model", str(saved_model), "--json", files[0], str(bad), *files[1:])
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["file"] for r in records} == set(files) | {str(bad)}
    errors = [r for r in records if r.get("error")]
    assert len(errors) == 1 and "notes.png" in errors[0]["error"] and "not an image" in errors[0]["error"]
    for record in records:
        if not record.get("error"):
            assert set(record["probabilities"]) == {"Normal", "Covid", "Viral Pneumonia"}
            assert abs(sum(record["probabilities"].values()) - 1) < 1e-4
            # the same keys as the CSV, the Python API and the demo's API
            assert set(record) == {"file", "label", "probabilities", "uncertain", "reasons"}
            top = max(record["probabilities"], key=record["probabilities"].get)
            assert record["label"] == ("uncertain" if record["uncertain"] else top)


def test_predict_text_output_and_success_status(saved_model):
    files = [str(p) for p in sorted(EXAMPLES.glob("*.jpeg"))]
    result = run("predict", "--model", str(saved_model), *files)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and "Normal=" in result.stdout


def test_an_unreadable_file_is_named_once_in_its_error_line(saved_model, tmp_path):
    (tmp_path / "tiny.png").write_bytes(EXAMPLES.joinpath("covid.jpeg").read_bytes()[:300])
    result = run("predict", "--model", str(saved_model), str(tmp_path / "tiny.png"))
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert line.startswith(f"{tmp_path / 'tiny.png'}: ERROR ") and line.count("tiny.png") == 1, line


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "chest-model"
    assert script.exists(), "pip install -e . must install the chest-model console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "predict" in result.stdout
    missing = subprocess.run([str(script), "predict", "--model", str(ROOT / "no-such-model"), "x.png"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_ood_check_reports_every_non_xray_image(saved_model):
    from chest_model.ood_check import non_xray_images

    result = run("ood-check", "--model", str(saved_model))
    assert result.returncode == 0, result.stderr
    n = len(non_xray_images())
    assert f" of {n} non-X-ray images flagged as uncertain" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith(("uncertain", "MISSED"))]) == n


def scan_folder(root: Path) -> dict[str, Path]:
    """Nested folders of real image files: the same name twice, mixed-case extensions, an
    extension-less DICOM, a broken file, a file that is no image, a hidden folder and an empty folder."""
    files = {
        "a/x.png": write_image(root / "a" / "x.png", synthetic_xray(90, 80, seed=1)),
        "b/x.png": write_image(root / "b" / "x.png", synthetic_xray(90, 80, seed=2, kind=1)),
        "b/deep/y.JPG": write_image(root / "b" / "deep" / "y.JPG", synthetic_xray(70, 70, seed=3, kind=2)),
    }
    files["b/deep/scan1"] = root / "b" / "deep" / "scan1"
    files["b/deep/scan1"].write_bytes(dicom_bytes(synthetic_xray(96, 96, seed=4).astype("uint16") * 16))
    files["b/broken.png"] = root / "b" / "broken.png"
    files["b/broken.png"].write_bytes((root / "a" / "x.png").read_bytes()[:60])  # truncated
    (root / "b" / "notes.txt").write_text("not an image, and not named like one: skipped")
    write_image(root / ".cache" / "thumb.png", synthetic_xray(64, 64))
    (root / "empty").mkdir()
    return files


def test_predict_folders_to_csv_with_gradcam(saved_model, tmp_path):
    scans = tmp_path / "scans"
    files = scan_folder(scans)
    out, cams = tmp_path / "out" / "predictions.csv", tmp_path / "cams"
    result = run("predict", "--model", str(saved_model), str(scans), str(scans / "empty"), "--csv", str(out),
                 "--gradcam-dir", str(cams), "--batch-size", "2")
    assert result.returncode == 1, result.stderr  # one file failed
    assert result.stdout == ""
    assert "100%" in result.stderr and "4 predicted, 2 failed" in result.stderr  # the progress bar, then the summary

    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["file", "label", "uncertain", "Normal", "Covid", "Viral Pneumonia", "error"]
        rows = {row["file"]: row for row in reader}
    assert set(rows) == {str(path) for path in files.values()} | {str(scans / "empty")}
    assert "no image files" in rows[str(scans / "empty")]["error"]
    broken = rows[str(files["b/broken.png"])]
    assert "broken.png" in broken["error"] and broken["label"] == broken["Covid"] == ""
    for name in ("a/x.png", "b/x.png", "b/deep/y.JPG", "b/deep/scan1"):
        row = rows[str(files[name])]
        probabilities = [float(row[c]) for c in ("Normal", "Covid", "Viral Pneumonia")]
        assert row["error"] == "" and row["uncertain"] in ("True", "False"), row
        assert row["label"] in {"Normal", "Covid", "Viral Pneumonia", "uncertain"}
        assert abs(sum(probabilities) - 1) < 1e-4
        heatmap = cv2.imread(str(cams / f"{name}.png"))  # the folders mirrored: two x.png never collide
        assert heatmap is not None and heatmap.ndim == 3, name
    assert cv2.imread(str(cams / "a" / "x.png.png")).tobytes() != cv2.imread(str(cams / "b" / "x.png.png")).tobytes()
    assert sorted(p.relative_to(cams).as_posix() for p in cams.rglob("*.png")) == sorted(
        f"{name}.png" for name in ("a/x.png", "b/x.png", "b/deep/y.JPG", "b/deep/scan1"))
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temporary file left behind


def test_predict_csv_matches_the_python_api_and_exits_zero(saved_model, tmp_path):
    from chest_model import ChestXrayClassifier

    out = tmp_path / "p.csv"
    result = run("predict", "--model", str(saved_model), str(EXAMPLES), "--csv", str(out))
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = sorted(EXAMPLES.glob("*.jpeg"))
    assert [row["file"] for row in rows] == [str(p) for p in files]
    expected = ChestXrayClassifier.from_pretrained(saved_model).analyze([str(p) for p in files])
    for row, record in zip(rows, expected):
        assert row["label"] == record["label"] and row["uncertain"] == str(record["uncertain"])
        for name, p in record["probabilities"].items():
            assert abs(float(row[name]) - p) < 1e-5


def test_predict_prints_a_line_per_file_of_a_folder(saved_model, tmp_path):
    files = scan_folder(tmp_path / "scans")
    result = run("predict", "--model", str(saved_model), "--json", str(tmp_path / "scans"))
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(p) for p in sorted(files.values())]
    assert [r["file"] for r in records if r.get("error")] == [str(files["b/broken.png"])]


# ---- errors: one base class, reported the same way by every command -----------------------------


def only_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def missing_model_argv(command: str, missing: Path, tmp_path: Path) -> list[str]:
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    rest = {
        "predict": [str(EXAMPLES / "covid.jpeg")],
        "evaluate": ["--data-dir", str(tmp_path)],
        "ood-check": [],
        "card": ["--metrics", str(metrics)],
        "export": ["--output", str(tmp_path / "m.onnx")],
        "space": ["--output", str(tmp_path / "space")],
    }[command]
    return [command, "--model", str(missing), *rest]


@pytest.mark.parametrize("command", ["predict", "evaluate", "ood-check", "card", "export", "space"])
def test_every_command_reports_a_missing_model_folder_in_one_line(command, tmp_path, capsys):
    missing = tmp_path / "no-model-here"
    assert main(missing_model_argv(command, missing, tmp_path)) == 2
    captured = capsys.readouterr()
    line = only_error_line(captured.err)
    assert str(missing) in line and "no such" in line, line
    assert captured.out == ""
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "space").exists()


def test_card_on_a_missing_model_folder_prints_no_traceback_as_a_real_process(tmp_path):
    missing = tmp_path / "nonexistent"
    result = run("card", "--model", str(missing), "--metrics", str(tmp_path / "x.json"))
    assert result.returncode == 2, result.stderr
    assert str(missing) in only_error_line(result.stderr)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ("[0.9, 0.8]", "expected a JSON object"),
])
def test_card_names_a_missing_or_malformed_metrics_file(saved_model, tmp_path, capsys, content, message):
    metrics = tmp_path / "metrics.json"
    if content is not None:
        metrics.write_text(content)
    assert main(["card", "--model", str(saved_model), "--metrics", str(metrics), "--output", str(tmp_path / "card.md")]) == 2
    line = only_error_line(capsys.readouterr().err)
    assert str(metrics) in line and message in line, line
    assert not (tmp_path / "card.md").exists()


@pytest.mark.parametrize("raised, status, message", [
    (chest_model.ImageLoadError("scan.png: cannot decode"), 2, "error: scan.png: cannot decode"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_main_turns_package_errors_and_ctrl_c_into_a_status(monkeypatch, capsys, raised, status, message):
    def command(args):
        raise raised

    monkeypatch.setattr("chest_model.cli.run_ood_check", command)
    assert main(["ood-check", "--model", "m"]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == message


def test_a_bug_is_not_mistaken_for_a_reported_error(monkeypatch):
    def command(args):
        raise TypeError("a bug")

    monkeypatch.setattr("chest_model.cli.run_ood_check", command)
    with pytest.raises(TypeError, match="a bug"):
        main(["ood-check", "--model", "m"])


def test_a_command_missing_its_extra_names_it_in_one_error_line(saved_model, tmp_path):
    """evaluate without scikit-learn (the train extra), as after `pip install .` alone."""
    make = ("import sys; sys.modules['sklearn'] = None; from chest_model.cli import main; "
            f"sys.exit(main(['evaluate', '--model', {str(saved_model)!r}, '--data-dir', {str(tmp_path / 'data')!r}]))")
    from helpers import make_class_folders

    make_class_folders(tmp_path / "data", per_class=2, size=40)
    result = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "`chest-model evaluate` needs sklearn, from the train extra: pip install '.[train]'" in result.stderr


def test_ood_check_says_which_bundled_images_it_could_not_use(saved_model):
    blocked = ("import sys; sys.modules['skimage'] = None; import importlib.util as u; real = u.find_spec; "
               "u.find_spec = lambda name, *a: None if name == 'skimage' else real(name, *a); "
               f"from chest_model.cli import main; sys.exit(main(['ood-check', '--model', {str(saved_model)!r}]))")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not checked: the images bundled with scikit-image (not installed" in result.stderr
    assert "scikit-image/" not in result.stdout


@pytest.mark.parametrize("option", ["--csv", "--gradcam-dir"])
def test_predict_refuses_an_output_it_cannot_write_before_reading_the_model(option, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file, where a folder would have to be")
    target = blocker / ("out.csv" if option == "--csv" else "cams")
    missing_model = tmp_path / "no-model-here"  # the output is checked first, so the model is never reached
    assert main(["predict", "--model", str(missing_model), option, str(target), str(EXAMPLES)]) == 2
    line = only_error_line(capsys.readouterr().err)
    assert f"{blocker} is a file" in line and "no-model-here" not in line


def test_predict_to_csv_with_a_class_named_like_a_column_fails_before_predicting(tiny_model, tmp_path, capsys):
    import dataclasses

    from chest_model import ChestXrayClassifier

    clashing = ChestXrayClassifier(dataclasses.replace(tiny_model.config, class_names=["Normal", "label", "error"]))
    clashing.save_pretrained(tmp_path / "model")
    assert main(["predict", "--model", str(tmp_path / "model"), "--csv", str(tmp_path / "out.csv"), str(EXAMPLES)]) == 2
    assert "class name(s) ['error', 'label'] would clash with the CSV's own columns" in only_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("argv", [["predict", "--model", "m", "--batch-size", "0", "x.png"],
                                  ["evaluate", "--model", "m", "--data-dir", "d", "--bootstrap", "-1"],
                                  ["evaluate", "--model", "m", "--data-dir", "d", "--bootstrap", "0"]])
def test_counts_that_cannot_work_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_a_device_that_is_not_here_is_refused_before_the_model_loads(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    result = run("predict", "--model", str(tmp_path / "no-model"), "--device", missing, "x.png")
    assert result.returncode == 2 and "no such CUDA GPU here" in result.stderr and "no-model" not in result.stderr


def test_evaluate_refuses_a_set_that_is_its_own_training_data(saved_model, tmp_path, capsys):
    """The metadata baseline would be fitted on the images it scores, and every image counted a copy."""
    from helpers import make_class_folders

    data = make_class_folders(tmp_path / "data", per_class=2, size=40, seed=1)
    for train in (data, tmp_path):  # the same folder, or one around it
        assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"test={data}", "--train-dir", str(train)]) == 2
        error = capsys.readouterr().err
        assert f"set 'test' {data}: shares files with the training data" in error and "Accuracy" not in error


def test_evaluate_checks_its_output_and_every_set_before_the_first_pass(saved_model, tmp_path, capsys):
    from helpers import make_class_folders

    good = make_class_folders(tmp_path / "good", per_class=2, size=40, seed=1)
    (tmp_path / "taken").write_text("a file")
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"a={good}", "--output-dir", str(tmp_path / "taken")]) == 2
    assert f"{tmp_path / 'taken'}: is a file" in only_error_line(capsys.readouterr().err)
    misnamed = make_class_folders(tmp_path / "bad", per_class=2, size=40, seed=2)
    (misnamed / "Normal").rename(misnamed / "normal")
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"a={good}", "--data-dir", f"b={misnamed}",
                 "--output-dir", str(out), "--bootstrap", "10"]) == 2
    assert "class folder(s) ['normal']" in capsys.readouterr().err
    assert not out.exists(), "nothing is evaluated or written before every set is checked"


def test_evaluate_gives_every_set_its_folder_and_clears_only_what_an_earlier_evaluation_wrote(saved_model, tmp_path):
    from helpers import make_class_folders

    full = make_class_folders(tmp_path / "full", per_class=2, size=40, seed=1)
    normals = make_class_folders(tmp_path / "adults", per_class=2, size=40, seed=3, class_names=["Normal"])
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"test={full}", "--output-dir", str(out),
                 "--bootstrap", "10"]) == 0
    (out / "notes.txt").write_text("the user's own file")
    assert (out / "confusion_matrix.png").is_file()
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"test={full}", "--data-dir", f"adults={normals}",
                 "--output-dir", str(out), "--bootstrap", "10"]) == 0
    assert not (out / "confusion_matrix.png").exists()  # the single set's figures, not this evaluation's
    assert sorted(p.name for p in out.iterdir()) == ["adults", "metrics.json", "notes.txt", "test"]
    assert json.loads((out / "adults" / "metrics.json").read_text())["true_counts"] == {"Normal": 2}
    document = json.loads((out / "metrics.json").read_text())
    assert set(document) == {"model_fingerprint", "sets"} and set(document["sets"]) == {"test", "adults"}
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"adults={normals}", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt"]


def test_card_refuses_a_metrics_file_of_several_sets_or_of_a_partial_set_naming_what_to_pass(saved_model, tmp_path, capsys):
    (tmp_path / "several.json").write_text(json.dumps({"model_fingerprint": "x", "sets": {"test": {}, "adults": {}}}))
    assert main(["card", "--model", str(saved_model), "--metrics", str(tmp_path / "several.json")]) == 2
    assert "pass its own file beside this one (test/metrics.json, adults/metrics.json)" in only_error_line(capsys.readouterr().err)
    (tmp_path / "partial.json").write_text(json.dumps({"name": "adults", "predicted_share": {"Normal": 1.0}}))
    assert main(["card", "--model", str(saved_model), "--metrics", str(tmp_path / "partial.json")]) == 2
    assert "only some classes" in only_error_line(capsys.readouterr().err)


def test_unreadable_files_are_named_within_their_set_not_by_local_path(saved_model, tmp_path):
    from helpers import make_class_folders

    data = make_class_folders(tmp_path / "set", per_class=2, size=40, seed=1)
    (data / "Covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", str(data), "--output-dir", str(tmp_path / "out"),
                 "--bootstrap", "10"]) == 0
    (message,) = json.loads((tmp_path / "out" / "metrics.json").read_text())["unreadable_files"]
    assert message.startswith("Covid/broken.png: ") and str(tmp_path) not in message


def test_a_stale_evaluation_never_reaches_outside_its_folder(tmp_path):
    from chest_model.evaluation import remove_stale_evaluation

    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    (tmp_path / "parent" / "metrics.json").write_text("{}")  # a neighbour that looks like a set's folder
    (out / "metrics.json").write_text(json.dumps({"sets": {"..": {}, "": {}, ".": {}, "gone": {}}}))
    (out / "gone").mkdir()
    (out / "gone" / "metrics.json").write_text("{}")
    remove_stale_evaluation(out, ["new"])
    assert (tmp_path / "parent" / "metrics.json").is_file() and (out / "metrics.json").is_file()
    assert not (out / "gone").exists()


def test_json_output_writes_a_probability_that_is_not_a_number_as_null(capsys):
    import argparse

    from chest_model.cli import _report

    result = {"label": "uncertain", "probabilities": {"Normal": float("nan"), "Covid": 0.5},
              "uncertain": True, "reasons": ["the model's output is not a number"]}
    _report(argparse.Namespace(json=True), "a.png", result=result)
    line = capsys.readouterr().out
    assert "NaN" not in line and json.loads(line)["probabilities"] == {"Normal": None, "Covid": 0.5}


def test_no_output_is_written_over_what_the_command_reads(saved_model, tmp_path, capsys):
    weights = (saved_model / "model.safetensors").read_bytes()
    image = write_image(tmp_path / "films" / "x.png", synthetic_xray(64, 64))
    before = image.read_bytes()
    cases = [
        (["export", "--model", str(saved_model), "--output", str(saved_model / "model.safetensors")],
         f"lies inside {saved_model}, which this command reads"),
        (["predict", "--model", str(saved_model), str(image), "--csv", str(image)], "is an input of this command"),
        (["predict", "--model", str(saved_model), str(image.parent), "--csv", str(image.parent / "out.csv")],
         "which this command reads"),
        (["card", "--model", str(saved_model), "--metrics", str(saved_model / "config.json"),
          "--output", str(saved_model / "config.json")], "is an input of this command"),
        (["evaluate", "--model", str(saved_model), "--data-dir", str(tmp_path / "films"),
          "--output-dir", str(tmp_path / "films" / "Normal")], "which this command reads"),
        (["export", "--model", str(saved_model), "--output", str(tmp_path / "newdir") + "/"], "names a folder"),
    ]
    for argv, says in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert (saved_model / "model.safetensors").read_bytes() == weights and image.read_bytes() == before
    assert not (tmp_path / "newdir").exists()


def test_a_card_takes_only_this_models_evaluate_metrics(saved_model, tmp_path, capsys):
    (tmp_path / "val.json").write_text(json.dumps({"n": 9, "accuracy": 0.9, "macro_f1": 0.9, "per_class": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"model_fingerprint": "x", "summary": "not metrics"}))
    for name, says in (("val.json", "does not record which model it measured"),
                       ("other.json", "not a metrics.json of `chest-model evaluate` (it lacks n, accuracy, macro_f1, per_class)")):
        capsys.readouterr()
        assert main(["card", "--model", str(saved_model), "--metrics", str(tmp_path / name),
                     "--output", str(tmp_path / "card.md")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "card.md").exists()


def test_a_set_named_like_a_report_file_is_refused_before_any_work(saved_model, tmp_path, capsys):
    folder = tmp_path / "test"
    for name in ("Normal", "Covid", "Viral Pneumonia"):
        write_image(folder / name / "a.png", synthetic_xray(64, 64))
    assert main(["evaluate", "--model", str(saved_model), "--data-dir", f"metrics.json={folder}",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "set name(s) ['metrics.json'] look like the report files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
