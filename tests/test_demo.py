"""The demo as users meet it: a real Gradio server, gradio_client, and a real Chromium."""
import base64
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from gradio_client.exceptions import AppError

from helpers import EXAMPLES, STARTER

pytestmark = [pytest.mark.server, pytest.mark.slow]
CLASSES = {"Normal", "Covid", "Viral Pneumonia"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Drops a file on the upload box the way a browser does (the file's bytes as base64, and its name).
DROP = """([b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
    const target = document.querySelector('#xray-upload button') || document.querySelector('#xray-upload');
    for (const type of ['dragenter', 'dragover', 'drop'])
        target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
}"""


def _predict(client, path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/predict")


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.jpeg")))
def test_predict_endpoint_returns_every_class(client, example):
    result = _predict(client, EXAMPLES / example)
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert set(confidences) == CLASSES
    assert abs(sum(confidences.values()) - 1) < 1e-4
    if (STARTER / "model.safetensors").exists():  # real X-rays from the test split: a class, not "Uncertain"
        assert result["label"] == max(confidences, key=confidences.get)
    else:
        assert result["label"] in {"Uncertain", max(confidences, key=confidences.get)}


def test_bad_files_get_errors_and_the_server_keeps_serving(client, tmp_path):
    corrupt = tmp_path / "scan.jpg"
    corrupt.write_bytes((EXAMPLES / "covid.jpeg").read_bytes()[:3000])
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an x-ray")
    for path, reason in ((corrupt, "truncated"), (notes, "not an image")):
        with pytest.raises(AppError) as info:  # the server's own refusal, not a client-side failure
            _predict(client, path)
        assert reason in str(info.value) and path.name in str(info.value)
        assert _predict(client, EXAMPLES / "normal.jpeg")["label"] in CLASSES


def test_oversize_upload_is_refused(client, server, tmp_path):
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes((EXAMPLES / "covid.jpeg").read_bytes() + os.urandom(2 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
        _predict(client, big)  # gradio_client reads the server's limit and refuses before sending
    with open(big, "rb") as handle:  # a caller without gradio_client: the server itself must refuse it
        response = httpx.post(f"{server.rstrip('/')}/gradio_api/upload", files={"files": ("big.png", handle, "image/png")})
    assert response.status_code == 413
    assert _predict(client, EXAMPLES / "covid.jpeg")["label"] in CLASSES


def test_explain_endpoint_returns_a_heat_map(client):
    from gradio_client import handle_file

    heat = client.predict(handle_file(str(EXAMPLES / "covid.jpeg")), "Predicted class", 0.5, api_name="/explain")
    assert Path(heat).is_file() and Path(heat).stat().st_size > 1000


def holiday_photo(path):
    import cv2
    import numpy as np

    # A holiday snap: blue sky, green grass, a red beach towel (BGR for OpenCV).
    photo = np.zeros((200, 240, 3), np.uint8)
    photo[:110] = (235, 170, 90)
    photo[110:] = (60, 170, 50)
    photo[130:170, 60:150] = (40, 40, 220)
    cv2.imwrite(str(path), cv2.GaussianBlur(photo, (0, 0), 2))
    return path


def test_the_predict_api_says_uncertain_for_a_photograph_with_every_class_confidence(client, tmp_path):
    result = _predict(client, holiday_photo(tmp_path / "holiday.jpg"))
    assert result["label"] == "Uncertain"
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert set(confidences) == CLASSES and abs(sum(confidences.values()) - 1) < 1e-4


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_drag_and_drop_in_a_real_browser(server, client, tmp_path):
    from playwright.sync_api import sync_playwright

    expected = _predict(client, EXAMPLES / "covid.jpeg")["label"]
    data = base64.b64encode((EXAMPLES / "covid.jpeg").read_bytes()).decode()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(server)
            page.wait_for_selector("#xray-upload")
            assert "Research demo, not for clinical use" in page.inner_text("body")
            page.evaluate(DROP, [data, "covid.jpeg"])
            top = page.wait_for_selector("#probabilities h2", timeout=60_000)
            assert top.inner_text().strip() == expected
            page.wait_for_selector("#gradcam img", timeout=60_000)
            page.wait_for_function("([name]) => document.querySelector('#gradcam').innerText.includes("
                                   "`Where the model looked for ${name}`)", arg=[expected], timeout=30_000)
            assert page.inner_text("#ood-warning").strip() == ""
            if (STARTER / "metrics.json").exists():  # the shortcut caveat carries the model's own measured figure
                shipped = json.loads((STARTER / "metrics.json").read_text())
                assert f"{shipped['audit']['metadata_baseline_accuracy']:.0%} of the time" in page.inner_text("body")
                worst = max(row["predicted_share"]["Covid"] for row in shipped["external"].values())
                assert f"up to {worst:.0%} of that source's normal adult X-rays Covid" in page.inner_text("body")
            # Another class to explain: the heat map is drawn again for it.
            before = page.get_attribute("#gradcam img", "src")
            page.get_by_label("Explain which class").click()
            other = next(name for name in sorted(CLASSES) if name != expected)  # whichever class the model did not pick
            page.get_by_role("option", name=other).click()
            page.wait_for_function("([before]) => document.querySelector('#gradcam img') && "
                                   "document.querySelector('#gradcam img').src !== before", arg=[before], timeout=60_000)
            page.wait_for_function("([name]) => document.querySelector('#gradcam').innerText.includes("
                                   "`Where the model looked for ${name}`)", arg=[other], timeout=30_000)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            # A photograph, in a fresh page: the label says "Uncertain" and the page says why.
            page.goto(server)
            page.wait_for_selector("#xray-upload")
            photo = base64.b64encode(holiday_photo(tmp_path / "holiday.jpg").read_bytes()).decode()
            page.evaluate(DROP, [photo, "holiday.jpg"])
            page.wait_for_function("document.querySelector('#ood-warning').innerText.includes('Uncertain')", timeout=60_000)
            assert "colour image" in page.inner_text("#ood-warning")
            assert page.inner_text("#probabilities h2").strip() == "Uncertain"
            page.wait_for_selector("#gradcam img", timeout=60_000)

            # Clearing the upload box clears the photograph's results, quietly; a file that cannot be read
            # then gets an error naming it, and no other file's label, warning or heat map stays on the page.
            page.click("#xray-upload button[aria-label=Clear]")
            page.wait_for_function("!document.querySelector('#gradcam img')", timeout=30_000)
            page.wait_for_function("!document.querySelector('#gradcam').innerText.includes('looked for')", timeout=30_000)
            assert page.inner_text("#ood-warning").strip() == "" and page.query_selector("#probabilities h2") is None
            page.wait_for_timeout(1000)
            assert page.query_selector_all("[data-testid=toast-body]") == []
            page.evaluate(DROP, [base64.b64encode(b"not an image\n" * 20).decode(), "scan.png"])
            toast = page.wait_for_selector("[data-testid=toast-body]", timeout=60_000)
            assert "scan.png: not an image" in toast.inner_text()
            assert page.inner_text("#ood-warning").strip() == ""
            assert page.query_selector("#gradcam img") is None and page.query_selector("#probabilities h2") is None
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_the_caveat_names_the_worst_left_out_source_and_only_all_normal_ones(tmp_path):
    from chest_model import ChestXrayClassifier
    from chest_model.demo import short_caveat, unseen_normals_called_covid

    ChestXrayClassifier().save_pretrained(tmp_path)
    assert unseen_normals_called_covid(ChestXrayClassifier.from_pretrained(tmp_path)) is None  # nothing measured
    row = lambda counts, covid: {"true_counts": counts, "predicted_share": {"Normal": 1 - covid, "Covid": covid}}  # noqa: E731
    (tmp_path / "metrics.json").write_text(json.dumps({"external": {
        "a": row({"Normal": 150}, 0.21), "b": row({"Normal": 139}, 0.79), "mixed": row({"Normal": 5, "Covid": 5}, 0.95)}}))
    worst = unseen_normals_called_covid(ChestXrayClassifier.from_pretrained(tmp_path))
    assert worst == pytest.approx(0.79)
    assert "up to 79% of that source's normal adult X-rays Covid" in short_caveat(0.77, worst)
    assert "adult-normal source" not in short_caveat(0.77)


def test_the_caveat_says_how_many_test_covid_films_were_called_normal(tmp_path):
    from chest_model import ChestXrayClassifier
    from chest_model.demo import covid_called_normal, short_caveat

    ChestXrayClassifier().save_pretrained(tmp_path)
    assert covid_called_normal(ChestXrayClassifier.from_pretrained(tmp_path)) is None  # nothing measured
    (tmp_path / "metrics.json").write_text(json.dumps({"class_names": ["Normal", "Covid", "Viral Pneumonia"],
                                                       "confusion_matrix": [[19, 0, 1], [7, 18, 1], [0, 0, 20]]}))
    missed = covid_called_normal(ChestXrayClassifier.from_pretrained(tmp_path))
    assert missed == (7, 26)
    assert "On its test split it called 7 of the 26 Covid films Normal: a Normal answer does not rule Covid out." in \
        short_caveat(0.77, None, None, missed)
    assert "Covid films Normal" not in short_caveat(0.77, None, None, (0, 26)) and "Covid films Normal" not in short_caveat(0.77)


def test_the_caveat_quotes_the_framing_check_for_normal_films_only(tmp_path):
    from chest_model import ChestXrayClassifier
    from chest_model.demo import cropped_normals_called_covid, short_caveat

    ChestXrayClassifier().save_pretrained(tmp_path)
    assert cropped_normals_called_covid(ChestXrayClassifier.from_pretrained(tmp_path)) is None  # nothing measured
    cell = lambda covid: {"called": {"Normal": 1 - covid, "Covid": covid}}  # noqa: E731
    groups = {"nih / Normal": {"framings": {"80% of each side": cell(0.9)}},
              "kaggle / Covid": {"framings": {"80% of each side": cell(0.95)}},
              "Normal": {"framings": {"80% of each side": cell(0.4)}}}
    (tmp_path / "card_context.json").write_text(json.dumps({"framing_check": {"groups": groups}}))
    worst = cropped_normals_called_covid(ChestXrayClassifier.from_pretrained(tmp_path))
    assert worst == pytest.approx(0.9)  # the Covid films' group is not a normal group
    assert "Cropped to 80% of each side around their centre, up to 90% of a group of normal films" in short_caveat(0.77, None, worst)
    # Without a packaged check, an evaluation's --framing-check (by true class) is used.
    (tmp_path / "card_context.json").unlink()
    (tmp_path / "metrics.json").write_text(json.dumps({"audit": {"framing": {"groups": {"Normal": groups["Normal"]}}}}))
    assert cropped_normals_called_covid(ChestXrayClassifier.from_pretrained(tmp_path)) == pytest.approx(0.4)


def test_a_model_that_cannot_be_loaded_stops_the_demo_with_one_error_line(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "demo" / "app.py"), "--model", str(tmp_path / "nonexistent")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'nonexistent'}: no such model folder"


def test_the_tutorial_datasets_caveat_is_shown_only_for_a_model_that_may_come_from_it(tmp_path):
    from chest_model import ChestXrayClassifier
    from chest_model.demo import GENERIC_CAVEAT, model_panel_markdown

    ChestXrayClassifier().save_pretrained(tmp_path / "unrecorded")  # the tutorial's classes, no record: warn
    ChestXrayClassifier(class_names=["Normal", "Pneumonia"]).save_pretrained(tmp_path / "other")
    panel = lambda name: model_panel_markdown(ChestXrayClassifier.from_pretrained(tmp_path / name), name, None)  # noqa: E731
    assert "children's" in panel("unrecorded") and GENERIC_CAVEAT not in panel("unrecorded")
    assert "children's" not in panel("other") and GENERIC_CAVEAT in panel("other")


def test_a_model_that_outputs_nan_gets_an_error_instead_of_a_heat_map(tiny_model, tmp_path):
    import gradio as gr

    from chest_model.demo import DemoService
    from helpers import synthetic_xray, write_image

    path = write_image(tmp_path / "film.png", synthetic_xray(80, 64))
    with torch.no_grad():
        tiny_model.head[-1].bias[0] = float("nan")
    with pytest.raises(gr.Error, match="not a number"):
        DemoService(tiny_model, "tiny").explain(str(path), "Predicted class", 0.45)


def test_the_heat_maps_title_names_the_class_it_explains():
    from chest_model.demo import heat_title

    assert heat_title({"target": "Covid"}) == {"__type__": "update", "label": "Where the model looked for Covid (Grad-CAM)"}
    assert heat_title(None)["label"] == "Where the model looked (Grad-CAM)"


def test_a_new_upload_clears_the_last_heat_map_and_its_title():
    from chest_model.demo import HEAT_TITLE, clear_results

    label, warning, heat, *states = clear_results()
    assert label is None and warning == "" and states == [None, None, None]
    assert heat == {"__type__": "update", "value": None, "label": HEAT_TITLE}


def test_the_model_panel_names_the_models_contrast_step(tmp_path):
    from chest_model import ChestXrayClassifier
    from chest_model.demo import model_panel_markdown

    ChestXrayClassifier(image_size=64, hidden_size=16, contrast="equalize").save_pretrained(tmp_path / "eq")
    ChestXrayClassifier(image_size=64, hidden_size=16).save_pretrained(tmp_path / "plain")
    panel = lambda name: model_panel_markdown(ChestXrayClassifier.from_pretrained(tmp_path / name), name, None)  # noqa: E731
    assert "**Input:** 64×64 px, converted to grey and each image's grey-level histogram equalised; backbone" in panel("eq")
    assert "**Input:** 64×64 px; backbone" in panel("plain")


def test_only_the_example_folders_images_are_offered(tmp_path):
    from chest_model.demo import example_files

    from helpers import synthetic_xray, write_image

    for name in ("README.md", ".DS_Store", "._b.jpeg", "notes.png"):  # notes.png: text under an image's name
        (tmp_path / name).write_bytes(b"x")
    write_image(tmp_path / "b.jpeg", synthetic_xray(64, 64))
    write_image(tmp_path / "A.PNG", synthetic_xray(64, 64))
    (tmp_path / "sub").mkdir()
    assert [p.name for p in example_files(tmp_path)] == ["A.PNG", "b.jpeg"]
    assert example_files(tmp_path / "missing") == [] and example_files(None) == []


def test_an_upload_is_decoded_once_for_its_label_and_every_heat_map(tiny_model, tmp_path, monkeypatch):
    import warnings

    import cv2
    import numpy as np

    import chest_model.preprocess
    from chest_model.demo import PREDICTED, DemoService
    from helpers import synthetic_xray

    decoded = []  # the files read and decoded (an already decoded array passed on is only checked)
    real = chest_model.preprocess.load_image

    def spy(source, *args, **kwargs):
        if not isinstance(source, np.ndarray):
            decoded.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(chest_model.preprocess, "load_image", spy)
    service = DemoService(tiny_model, "tiny", precision="auto")
    path = tmp_path / "scan.png"
    cv2.imwrite(str(path), synthetic_xray(120, 100, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shared decoded image is read-only: nothing may write to it
        label, _, top = service.predict_with_warning(str(path))
        shown = dict(label) if isinstance(label, dict) else {c.label: c.confidence for c in label.confidences}
        assert top == max(shown, key=shown.get)
        own = service.explain(str(path), PREDICTED, 0.5)[1]["target"]  # an API call: Grad-CAM's own top class
        other = next(name for name in tiny_model.class_names if name != own)
        # On the page "Predicted class" is the class the label shows, from the label's own pass and precision.
        assert service.explain(str(path), PREDICTED, 0.5, predicted=other)[1]["target"] == other
        assert service.explain(str(path), "Covid", 0.3, predicted=other)[1]["target"] == "Covid"
    assert decoded == [str(path)]
    cv2.imwrite(str(path), synthetic_xray(100, 120, seed=2))  # the same path, another file: decoded again
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    _, state = service.explain(str(path), "Normal", 0.5)
    assert len(decoded) == 2 and state["image"].shape[:2] == (100, 120)


def test_the_decoded_uploads_kept_stay_within_their_memory_budget(tiny_model, tmp_path, monkeypatch):
    import cv2

    from chest_model.demo import DemoService
    from helpers import synthetic_xray

    service = DemoService(tiny_model, "tiny")
    monkeypatch.setattr(service, "DECODED_BYTES", 3 * 200 * 200 * 3)  # three 200 x 200 RGB images
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i}.png"), synthetic_xray(200, 200, seed=i))
        service.load(str(tmp_path / f"{i}.png"))
    assert [key[0] for key in service._decoded] == [str(tmp_path / f"{i}.png") for i in (2, 3, 4)]
    cv2.imwrite(str(tmp_path / "big.png"), synthetic_xray(400, 400))
    assert service.load(str(tmp_path / "big.png")).shape == (400, 400, 3)  # served, but too large to keep
    assert len(service._decoded) == 3


def test_the_examples_survive_the_sweep_of_old_uploads(tiny_model, tmp_path):
    from gradio.route_utils import delete_files_created_by_app

    from chest_model.demo import build_demo
    from helpers import synthetic_xray, write_image

    write_image(tmp_path / "examples" / "film.png", synthetic_xray(64, 64))
    demo = build_demo(tiny_model, "tiny", examples_dir=tmp_path / "examples")
    copies = {path for files in demo.temp_file_sets for path in files if Path(path).name == "film.png"}
    assert copies, "Gradio copied the example into its cache"
    delete_files_created_by_app(demo, age=None)  # what the hourly sweep does to uploads once they are old enough
    assert all(Path(path).is_file() for path in copies)


def test_an_expired_upload_is_named_as_such(tiny_model, tmp_path):
    import gradio as gr

    from chest_model.demo import DemoService

    with pytest.raises(gr.Error, match="no longer on the server"):
        DemoService(tiny_model, "tiny").load(str(tmp_path / "gradio" / "swept.png"))


def test_the_heat_map_of_a_very_long_film_is_shrunk_for_the_page(tiny_model, tmp_path):
    from chest_model.demo import DISPLAY_SIDE, DemoService
    from helpers import synthetic_xray, write_image

    path = write_image(tmp_path / "long.png", synthetic_xray(17000, 400))  # past WebP's 16383 px
    picture, state = DemoService(tiny_model, "tiny").explain(str(path), "Predicted class", 0.45)
    assert picture.shape[:2] == (DISPLAY_SIDE, round(400 * DISPLAY_SIDE / 17000))
    assert state["heatmap"].shape == picture.shape[:2] and state["image"].shape == picture.shape


@pytest.mark.parametrize("height, width", [(300, 200), (4800, 2400)])  # the second: read at reduced scale, shown at 2048
def test_the_pages_heat_map_lands_where_the_evidence_is_on_an_exif_rotated_jpeg(tmp_path, height, width):
    import numpy as np
    from PIL import Image

    from chest_model.demo import DemoService
    from helpers import block_detector, centre_of_heat, film_with_block

    shown = film_with_block(height, width, top=0.6, left=0.1)  # the film as a viewer shows it
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter, to be turned clockwise for display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(shown))).save(path, quality=95, exif=exif.tobytes())
    picture, state = DemoService(block_detector(128), "block").explain(str(path), "Covid", 0.45)
    assert state["image"].shape[0] > state["image"].shape[1]  # upright, as the viewer shows it
    y, x = centre_of_heat(state["heatmap"])
    assert abs(y - 0.7) < 0.08 and abs(x - 0.2) < 0.08, (y, x)


def test_a_jpeg_the_model_reads_at_reduced_scale_is_shown_at_its_own_size(tiny_model, tmp_path):
    import cv2

    from chest_model.demo import DemoService
    from helpers import synthetic_xray

    path = tmp_path / "film.jpg"
    cv2.imwrite(str(path), synthetic_xray(1000, 800, seed=3))
    service = DemoService(tiny_model, "tiny")
    assert max(service.load(str(path)).shape[:2]) < 1000  # the model's decode: reduced (DCT scaling)
    picture, state = service.explain(str(path), "Predicted class", 0.45)
    assert picture.shape[:2] == state["image"].shape[:2] == state["heatmap"].shape == (1000, 800)
    shown = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert abs(state["image"].astype(int) - shown).mean() < 1  # the file itself, not an upscaled copy
    tall = tmp_path / "tall.jpg"  # larger than the page: decoded at half scale, then shrunk to its size
    cv2.imwrite(str(tall), synthetic_xray(4800, 2400, seed=4))
    picture, state = service.explain(str(tall), "Predicted class", 0.45)
    assert picture.shape[:2] == state["heatmap"].shape == (2048, 1024)
    assert [key[3] for key in service._decoded if key[0] == str(tall)] == [None, 1024]  # model's decode, page's decode


def test_every_model_pass_shares_one_concurrency_limit(tiny_model):
    from chest_model.demo import MODEL_PASSES, build_demo

    demo = build_demo(tiny_model, "tiny")
    passes = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") in ("predict_with_warning", "explain")]
    assert len(passes) == 3 and {fn.concurrency_id for fn in passes} == {MODEL_PASSES}


def test_launch_mistakes_are_one_error_line(tmp_path):
    import socket
    import subprocess
    import sys

    from helpers import ROOT

    app = [sys.executable, str(ROOT / "demo" / "app.py"), "--model", str(STARTER)]
    size = subprocess.run([*app, "--max-file-size", "lots"], capture_output=True, text=True, timeout=120)
    assert size.returncode == 2 and "is not a file size" in size.stderr and "Traceback" not in size.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([*app, "--port", str(port)], capture_output=True, text=True, timeout=180)
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    assert busy.stderr.strip().splitlines()[-1].startswith(f"error: cannot serve on 127.0.0.1:{port}")
