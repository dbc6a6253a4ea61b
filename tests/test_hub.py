"""Saving, strict loading, pickle refusal and the Hub boundary (the only thing faked)."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import chest_model.hub as hub
from chest_model import ChestXrayClassifier, ChestXrayConfig, ModelLoadError
from helpers import synthetic_xray

MODEL_FILES = {"config.json", "model.safetensors", "README.md"}


def test_save_writes_exactly_config_weights_and_card(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == MODEL_FILES
    assert json.loads((tmp_path / "m" / "config.json").read_text())["image_size"] == 32
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Research demo, not for clinical use" in card and "pipeline_tag: image-classification" in card
    assert not list(tmp_path.glob(".*")), "no temporary folders left behind"


def test_default_model_saves_a_config_too(tmp_path):
    ChestXrayClassifier().save_pretrained(tmp_path / "m")
    assert ChestXrayConfig.load(tmp_path / "m" / "config.json") == ChestXrayConfig()


def test_round_trip_gives_bit_identical_logits(tiny_model, tmp_path):
    tiny_model.config.temperature = 1.5
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = ChestXrayClassifier.from_pretrained(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == tiny_model.config
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny_model(x), loaded(x))
    image = synthetic_xray(50, 40)
    assert tiny_model.predict(image) == loaded.predict(image)


def test_loading_is_strict_and_names_the_keys(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state.pop("head.5.bias")
    state["head.9.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ModelLoadError) as info:
        ChestXrayClassifier.from_pretrained(tmp_path / "m")
    assert "head.5.bias" in str(info.value) and "head.9.weight" in str(info.value)


def test_shape_mismatch_between_config_and_weights(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["class_names"] = ["A", "B"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="head.5.weight"):
        ChestXrayClassifier.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("content, message", [('{"image_size": "big"}', "image_size"), ("not json", "JSON"), ('{"layers": 3}', "unknown key")])
def test_bad_config_json_is_rejected(tiny_model, tmp_path, content, message):
    tiny_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(content)
    with pytest.raises(ModelLoadError, match=message):
        ChestXrayClassifier.from_pretrained(tmp_path / "m")


def test_corrupt_safetensors_is_reported(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        ChestXrayClassifier.from_pretrained(tmp_path / "m")


def test_weights_with_nan_or_inf_are_refused_by_name(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["head.5.bias"] = torch.tensor([float("nan"), 0.0, float("inf")])
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensors with NaN or infinite values: head.5.bias "):
        ChestXrayClassifier.from_pretrained(tmp_path / "m")


def test_an_override_is_named_as_the_argument_not_blamed_on_config_json(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"^from_pretrained\(temperature=\.\.\.\): .*temperature") as info:
        ChestXrayClassifier.from_pretrained(tmp_path / "m", temperature=0)
    assert "config.json" not in str(info.value)


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(name):
    with pytest.raises(ModelLoadError, match="no model given"):
        ChestXrayClassifier.from_pretrained(name)


class _Exploit:
    """Unpickling this creates a file: proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_pickle_checkpoints_are_never_loaded(tiny_model, tmp_path, filename):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / filename, "wb") as handle:
        pickle.dump(_Exploit(str(marker)), handle)
    torch.save({"payload": _Exploit(str(marker))}, folder / "also.bin")
    with pytest.raises(ModelLoadError) as info:
        ChestXrayClassifier.from_pretrained(folder)
    assert "safetensors" in str(info.value) and filename in str(info.value)
    assert not marker.exists()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        ChestXrayClassifier.from_pretrained(tmp_path / "does-not-exist")


def test_interrupted_save_leaves_the_previous_model_intact(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder)
    (folder / "history.json").write_text("[]")  # a training run's other files must survive saves
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(hub, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temporary folder cleaned up"
    monkeypatch.undo()
    tiny_model.save_pretrained(folder)
    assert (folder / "history.json").read_text() == "[]"


class FakeHfApi:
    """Stands in for the network boundary: records what would be uploaded."""

    uploads: list = []
    branches: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        FakeHfApi.branches.append((repo_id, branch, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        if allow_patterns:
            files = {k: v for k, v in files.items() if k in allow_patterns}
        FakeHfApi.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/abc"


def test_push_to_hub_uploads_our_three_files_and_our_card(tiny_model, monkeypatch):
    import huggingface_hub

    FakeHfApi.uploads = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    url = tiny_model.push_to_hub("me/chest-xray", private=True)
    assert url.endswith("/commit/abc")
    (upload,) = FakeHfApi.uploads
    assert upload["repo_id"] == "me/chest-xray"
    assert set(upload["files"]) == MODEL_FILES
    card = upload["files"]["README.md"].decode()
    assert "Research demo, not for clinical use" in card
    assert "This is a model that has been pushed to the Hub using the [PyTorchModelHubMixin]" not in card
    assert 'from_pretrained("me/chest-xray")' in card  # the repo it was pushed to, never a placeholder
    assert json.loads(upload["files"]["config.json"]) == tiny_model.config.to_dict()


def test_from_pretrained_hub_repo_goes_through_snapshot_download(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    tiny_model.save_pretrained(tmp_path / "cache" / "snap")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        return str(tmp_path / "cache" / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = ChestXrayClassifier.from_pretrained("me/chest-xray", revision="v1")
    assert calls == [("me/chest-xray", "v1", sorted(MODEL_FILES))]
    assert model.revision == "v1" and not model.training


def test_hub_offline_fails_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="could not download from the Hugging Face Hub"):
        ChestXrayClassifier.from_pretrained("someone/not-cached")


def test_push_while_offline_says_what_to_do(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubUploadError, match=r"^me/chest-xray: could not upload to the Hugging Face Hub .*HF_HUB_OFFLINE is set"):
        tiny_model.push_to_hub("me/chest-xray")


def test_a_push_the_hub_refuses_is_one_line_of_advice(tiny_model, monkeypatch):
    import huggingface_hub

    class Unreachable(FakeHfApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    with pytest.raises(hub.HubUploadError, match=r"me/chest-xray: could not upload .*ConnectionError.*`hf auth login`"):
        tiny_model.push_to_hub("me/chest-xray")


def test_a_training_run_whose_push_fails_names_the_saved_model(tmp_path, monkeypatch, clean_accelerate, capsys):
    import huggingface_hub

    from chest_model.training import main
    from helpers import make_class_folders

    class Refusing(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise PermissionError("403 Forbidden: you have no write access to me/chest-xray")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    data = make_class_folders(tmp_path / "data", per_class=4, size=48)
    run = tmp_path / "run"
    code = main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "32", "--batch-size", "4",
                 "--weights", "none", "--epochs", "1", "--cpu-threads", "1", "--checkpointing-steps", "none",
                 "--push-to-hub", "me/chest-xray"])
    assert code == 2
    error = capsys.readouterr().err
    assert "me/chest-xray: could not upload" in error and "403 Forbidden" in error
    assert f"The trained model is saved in {run}" in error
    assert (run / "model.safetensors").is_file()  # saved before the push was tried
    ChestXrayClassifier.from_pretrained(run)


def test_training_folder_push_uploads_only_the_model_files(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.uploads = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    run = tmp_path / "run"
    tiny_model.save_pretrained(run, card_context={"model_name": "my run", "repo_id": "me/run"})  # as train.py --push-to-hub
    (run / "history.json").write_text("[]")
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "optimizer.bin").write_bytes(b"x")
    tiny_model.push_to_hub("me/run", folder=run)
    (upload,) = FakeHfApi.uploads
    assert set(upload["files"]) == MODEL_FILES
    assert upload["files"]["README.md"] == (run / "README.md").read_bytes()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.uploads = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.uploads


def test_a_loaded_model_pushes_the_card_that_lives_with_its_weights(tiny_model, tmp_path, fake_hub):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder, card_context={"model_name": "measured run", "repo_id": "me/chest-xray"},
                               weights_dtype=torch.float16)
    ChestXrayClassifier.from_pretrained(folder).push_to_hub("me/chest-xray")
    (upload,) = fake_hub
    assert {name: upload["files"][name] for name in MODEL_FILES} == {name: (folder / name).read_bytes() for name in MODEL_FILES}


def test_a_card_saved_without_a_repo_id_gets_the_real_one_and_nothing_else(tiny_model, tmp_path, fake_hub):
    from chest_model.card import LOCAL_PLACEHOLDER

    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder, card_context={"model_name": "measured run"})
    original = (folder / "README.md").read_text()
    assert LOCAL_PLACEHOLDER in original
    ChestXrayClassifier.from_pretrained(folder).push_to_hub("me/chest-xray")
    card = fake_hub[0]["files"]["README.md"].decode()
    assert LOCAL_PLACEHOLDER not in card and 'from_pretrained("me/chest-xray")' in card
    assert card.replace("me/chest-xray", LOCAL_PLACEHOLDER) == original
    assert fake_hub[0]["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_a_card_naming_a_local_folder_names_the_repo_on_the_hub(tiny_model, tmp_path, fake_hub):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder, card_context={"repo_id": "demo/starter-model"})
    original = (folder / "README.md").read_text()
    ChestXrayClassifier.from_pretrained(folder).push_to_hub("me/chest-xray")
    card = fake_hub[0]["files"]["README.md"].decode()
    assert "demo/starter-model" not in card
    assert card.replace("me/chest-xray", "demo/starter-model") == original


def test_a_model_without_a_card_gets_one_with_the_figures_its_folder_holds(tiny_model, tmp_path, fake_hub):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder)
    (folder / "README.md").unlink()
    metrics = {"n": 12, "accuracy": 0.75, "macro_f1": 0.7, "roc_auc": {"macro": 0.8125, "per_class": {}},
               "per_class": {c: {"precision": 0.7, "recall": 0.7, "f1": 0.7, "support": 4} for c in tiny_model.class_names},
               "confusion_matrix": [[3, 1, 0], [0, 3, 1], [1, 0, 3]]}
    (folder / "eval").mkdir()
    (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
    ChestXrayClassifier.from_pretrained(folder).push_to_hub("me/chest-xray")
    card = fake_hub[0]["files"]["README.md"].decode()
    assert "No test-set evaluation is recorded" not in card and "0.8125" in card  # macro ROC-AUC in the model-index
    assert 'from_pretrained("me/chest-xray")' in card


def test_a_model_changed_since_loading_does_not_push_the_old_card(tiny_model, tmp_path, fake_hub):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder, card_context={"model_name": "measured run"})
    model = ChestXrayClassifier.from_pretrained(folder)
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # e.g. fine-tuned further
    model.push_to_hub("me/chest-xray")
    (upload,) = fake_hub
    assert "measured run" not in upload["files"]["README.md"].decode()
    assert upload["files"]["model.safetensors"] != (folder / "model.safetensors").read_bytes()


def test_saving_another_model_over_a_folder_drops_the_records_that_described_the_old_one(tiny_model, tmp_path, caplog):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"accuracy": 0.99, "n": 66}))
    (folder / "eval").mkdir()
    (folder / "eval" / "metrics.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    other = ChestXrayClassifier(tiny_model.config)
    with caplog.at_level("WARNING"):
        other.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == MODEL_FILES | {"notes.txt"}
    assert "held another model" in caplog.text and "metrics.json" in caplog.text
    # The same model saved again keeps them: they still describe it.
    (folder / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "n": 66}))
    other.save_pretrained(folder)
    assert json.loads((folder / "metrics.json").read_text())["accuracy"] == 0.5


def test_a_loaded_model_saved_elsewhere_keeps_its_card_and_records_while_unchanged(tiny_model, tmp_path):
    source = tmp_path / "source"
    tiny_model.save_pretrained(source, card_context={"model_name": "the measured one"}, weights_dtype=torch.float16)
    (source / "metrics.json").write_text(json.dumps({"accuracy": 0.75, "n": 8}))
    loaded = ChestXrayClassifier.from_pretrained(source)
    loaded.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").read_text() == (source / "README.md").read_text()
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert (tmp_path / "copy" / "metrics.json").read_text() == (source / "metrics.json").read_text()
    with torch.no_grad():  # changed since loading: a fresh card, no records
        next(loaded.parameters()).add_(1.0)
    loaded.save_pretrained(tmp_path / "changed")
    assert {p.name for p in (tmp_path / "changed").iterdir()} == MODEL_FILES
    assert "the measured one" not in (tmp_path / "changed" / "README.md").read_text()


def test_saving_onto_a_file_is_refused_and_a_symlink_is_written_through(tiny_model, tmp_path):
    from chest_model import ChestModelError

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(ChestModelError, match="afile: is a file, not a folder"):
        tiny_model.save_pretrained(afile)
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    tiny_model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and {p.name for p in (tmp_path / "real").iterdir()} == MODEL_FILES


def test_what_a_killed_save_leaves_is_cleared_by_the_next_save(tmp_path):
    """A real process saving a full-size model in a loop, killed with SIGKILL mid-write."""
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "m"
    script = ("import sys; from chest_model import ChestXrayClassifier; m = ChestXrayClassifier(); "
              "[m.save_pretrained(sys.argv[1]) for _ in range(1000)]")
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(folder)])
        deadline = time.time() + 120
        while time.time() < deadline and not any(p.name.startswith(".m.tmp-") for p in tmp_path.iterdir()):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if any(p.name.startswith(".m.") for p in tmp_path.iterdir()):
            break
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    assert leftovers, "no kill landed inside a save"
    ChestXrayClassifier(image_size=32, hidden_size=8).save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert ChestXrayClassifier.from_pretrained(folder).config.image_size == 32


def test_mistyped_or_unsupported_arguments_are_named(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['subfolder'\]"):
        ChestXrayClassifier.from_pretrained(tmp_path / "m", subfolder="x")
    monkeypatch.setattr(hub, "resolve_model_folder", lambda *a, **k: pytest.fail("checked before any download"))
    with pytest.raises(TypeError, match="proxies"):
        ChestXrayClassifier.from_pretrained("someone/model", proxies={})
    monkeypatch.undo()
    assert ChestXrayClassifier.from_pretrained(tmp_path / "m", temperature=2.0).config.temperature == 2.0  # a config field
    with pytest.raises(TypeError, match="bogus"):
        tiny_model.save_pretrained(tmp_path / "n", bogus=True)
    with pytest.raises(ValueError, match="only saved as safetensors"):
        tiny_model.save_pretrained(tmp_path / "n", safe_serialization=False)
    assert not (tmp_path / "n").exists()


def test_a_folder_without_weights_or_pickles_is_not_a_model_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no model.safetensors: not a saved model folder") as info:
        ChestXrayClassifier.from_pretrained(tmp_path / "m")
    assert "pickle" not in str(info.value).lower()


def test_a_config_that_does_not_fit_the_weights_says_so_briefly(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["backbone"] = "vgg19_bn"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"more \(\d+ in all\)") as info:
        ChestXrayClassifier.from_pretrained(tmp_path / "m")
    assert len(str(info.value)) < 1000


def test_a_push_to_a_branch_creates_it_and_its_card_loads_that_branch(tiny_model, tmp_path, fake_hub):
    FakeHfApi.branches = []
    tiny_model.save_pretrained(tmp_path / "m", card_context={"repo_id": "me/chest-xray"})
    loaded = ChestXrayClassifier.from_pretrained(tmp_path / "m")
    loaded.push_to_hub("me/chest-xray", branch="dev", delete_patterns="*.bin")
    (upload,) = fake_hub
    assert FakeHfApi.branches == [("me/chest-xray", "dev", True)]
    assert upload["revision"] == "dev" and upload["delete_patterns"] == "*.bin"
    card = upload["files"]["README.md"].decode()
    assert 'from_pretrained("me/chest-xray", revision="dev")' in card and "--model me/chest-xray --revision dev " in card
    assert card.replace('", revision="dev"', '"').replace(" --revision dev", "") == (tmp_path / "m" / "README.md").read_text()


def test_the_same_model_saved_again_in_float16_keeps_its_records(tiny_model, tmp_path):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder, weights_dtype=torch.float16)
    (folder / "metrics.json").write_text("{}")
    tiny_model.save_pretrained(folder, weights_dtype=torch.float16)
    assert (folder / "metrics.json").exists()


def test_a_card_naming_a_branch_names_the_new_one_or_none():
    from chest_model.card import card_for_repo

    card = 'x = ChestXrayClassifier.from_pretrained("me/a", revision="dev")\n`chest-model space --model me/a --revision dev --output s`'
    assert card_for_repo(card, "me/b", "v2") == ('x = ChestXrayClassifier.from_pretrained("me/b", revision="v2")\n'
                                                 '`chest-model space --model me/b --revision v2 --output s`')
    assert card_for_repo(card, "me/a") == 'x = ChestXrayClassifier.from_pretrained("me/a")\n`chest-model space --model me/a --output s`'
    plain = 'ChestXrayClassifier.from_pretrained("me/a")'
    assert card_for_repo(plain, "me/a") == plain


def test_a_loaded_model_cast_to_bfloat16_is_a_changed_model_and_gets_a_fresh_card(tiny_model, tmp_path):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder, card_context={"model_name": "measured run"})
    (folder / "metrics.json").write_text("{}")
    loaded = ChestXrayClassifier.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "same")
    assert (tmp_path / "same" / "metrics.json").exists()  # unchanged: its records travel with it
    loaded.to(torch.bfloat16).save_pretrained(tmp_path / "cast")
    assert not (tmp_path / "cast" / "metrics.json").exists()  # measured on other weights
    assert "measured run" not in (tmp_path / "cast" / "README.md").read_text()


def test_storing_in_half_precision_keeps_the_card_only_where_the_weights_stay_the_same(tiny_model, tmp_path, caplog):
    fp16 = tmp_path / "fp16"
    tiny_model.save_pretrained(fp16, card_context={"model_name": "measured run"}, weights_dtype=torch.float16)
    ChestXrayClassifier.from_pretrained(fp16).save_pretrained(tmp_path / "again", weights_dtype=torch.float16)
    assert "measured run" in (tmp_path / "again" / "README.md").read_text()
    fp32 = tmp_path / "fp32"
    tiny_model.save_pretrained(fp32, card_context={"model_name": "measured run"})
    ChestXrayClassifier.from_pretrained(fp32).save_pretrained(tmp_path / "halved", weights_dtype=torch.float16)
    assert "measured run" not in (tmp_path / "halved" / "README.md").read_text()
    assert "changes them" in caplog.text


def test_integer_tensors_where_the_model_holds_floats_are_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["head.5.weight"] = state["head.5.weight"].to(torch.int8)
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError, match=r"dtype mismatch head\.5\.weight: file torch\.int8 vs model torch\.float32"):
        ChestXrayClassifier.from_pretrained(tmp_path / "m")


def test_a_revision_for_a_local_folder_is_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="local folder, which has no revisions"):
        ChestXrayClassifier.from_pretrained(tmp_path / "m", revision="v2")


@pytest.mark.parametrize("device, message", [("gpu", "unknown device"), ("meta", "cannot run the model"),
                                             pytest.param("cuda", "no such CUDA GPU", marks=pytest.mark.skipif(
                                                 torch.cuda.is_available(), reason="a GPU is present"))])
def test_a_map_location_that_is_not_here_is_refused_before_loading(tiny_model, tmp_path, device, message):
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=f"map_location: .*{message}"):
        ChestXrayClassifier.from_pretrained(tmp_path / "m", map_location=device)


@pytest.mark.parametrize("repo_files", [["pytorch_model.bin"], ["config.json", "README.md", "pytorch_model.bin"]])
def test_a_hub_repo_with_only_pickled_weights_says_to_convert_them(tmp_path, monkeypatch, repo_files):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"  # snapshot_download leaves only what matched our three names

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        for name in set(repo_files) & set(allow_patterns):
            snapshot.mkdir(exist_ok=True)
            (snapshot / name).write_text("{}")
        return str(snapshot)

    class RepoWithPickles(FakeHfApi):
        def list_repo_files(self, repo_id, revision=None, **kwargs):
            return repo_files

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", RepoWithPickles)
    with pytest.raises(ModelLoadError, match="me/old-model: no model.safetensors. It has pytorch_model.bin, which are never loaded"):
        ChestXrayClassifier.from_pretrained("me/old-model")


def test_records_saved_with_the_model_are_swapped_in_with_it_or_not_at_all(tmp_path, tiny_model):
    from safetensors.torch import load_file

    from chest_model.hub import save_model_folder

    folder = tmp_path / "run"
    save_model_folder(tiny_model, folder, card_context={}, records={"history.json": "[1]"})
    assert (folder / "history.json").read_text() == "[1]"
    before = load_file(str(folder / "model.safetensors"))

    def full_disk(path):
        raise OSError(28, "No space left on device")

    changed = ChestXrayClassifier(tiny_model.config)
    with pytest.raises(hub.FolderWriteError, match=f"{folder}: could not write the model folder .no space left on the device.; "
                                                   "the folder is as it was"):
        save_model_folder(changed, folder, card_context={},
                          records={"history.json": "[1, 2]", "training_curves.png": full_disk})
    # The earlier model and its own records, together; nothing of the failed save.
    assert (folder / "history.json").read_text() == "[1]" and not (folder / "training_curves.png").exists()
    after = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_saving_its_best_epoch_so_far_drops_the_records_of_an_earlier_finish(tmp_path, tiny_model):
    from chest_model.hub import save_model_folder

    folder = tmp_path / "run"
    save_model_folder(tiny_model, folder, card_context={}, records={"history.json": "[1]", "train_config.json": "{}"})
    (folder / "eval").mkdir()
    (folder / "notes.txt").write_text("mine")
    save_model_folder(ChestXrayClassifier(tiny_model.config), folder, card_context={}, drop_records=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
