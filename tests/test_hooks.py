"""Hooks on a shared model see only their own thread's passes: the demo serves requests concurrently."""
import threading

import numpy as np
import pytest
import torch

from chest_model import ChestXrayClassifier
from chest_model.calibrate import fit_feature_gate
from chest_model.explain import gradcam
from chest_model.hooks import this_thread_only
from helpers import synthetic_xray

from test_feature_ood import cached


@pytest.fixture(scope="module")
def gated_model():
    torch.manual_seed(0)
    model = ChestXrayClassifier(image_size=64, hidden_size=16).eval()
    fit_feature_gate(model, cached(40, 0, kind=None, size=64), cached(20, 500, kind=None, size=64), fpr=0.1)
    return model


def _in_threads(work, n_threads=4, rounds=6):
    """``work(thread, round)`` in ``n_threads`` threads released together each round; their results."""
    barrier = threading.Barrier(n_threads)
    results, errors = {}, []

    def run(t):
        try:
            for r in range(rounds):
                barrier.wait()
                results[t, r] = work(t, r)
        except Exception as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def _images(n):
    return [np.stack([synthetic_xray(200, 180, seed=40 + i, kind=i % 3)] * 3, axis=-1) for i in range(n)]


def test_a_hook_runs_for_its_own_thread_and_not_for_others():
    seen = []
    hook = this_thread_only(lambda *args: seen.append(threading.get_ident()))
    hook(None, None)
    other = threading.Thread(target=hook, args=(None, None))
    other.start()
    other.join()
    assert seen == [threading.get_ident()]


def test_concurrent_predictions_on_one_model_match_sequential_ones(gated_model):
    torch.set_num_threads(1)  # several requests at once, as the demo's worker threads run them
    images = _images(4)
    alone = [gated_model.infer([image]) for image in images]
    together = _in_threads(lambda t, _r: gated_model.infer([images[t]]))
    for (t, _r), result in together.items():
        torch.testing.assert_close(result.probabilities, alone[t].probabilities)
        torch.testing.assert_close(result.feature_scores, alone[t].feature_scores)


def test_concurrent_gradcams_on_one_model_match_sequential_ones(gated_model):
    torch.set_num_threads(1)
    inputs = [gated_model.preprocessor(image).unsqueeze(0) for image in _images(4)]
    alone = [gradcam(gated_model, x) for x in inputs]
    together = _in_threads(lambda t, _r: gradcam(gated_model, inputs[t]))
    for (t, _r), (cam, logits, index) in together.items():
        np.testing.assert_allclose(cam, alone[t][0], atol=1e-5)
        torch.testing.assert_close(logits, alone[t][1])
        assert index == alone[t][2]
