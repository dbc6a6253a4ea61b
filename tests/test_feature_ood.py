"""The feature-space out-of-distribution gate: fitted on training images, thresholded on validation X-rays."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chest_model import ChestXrayClassifier, feature_ood
from chest_model.calibrate import block_summaries, fit_feature_gate
from helpers import synthetic_xray


def cached(n, seed, kind=0, size=32):
    images = [np.stack([synthetic_xray(size, size, seed=seed + i, kind=i % 3 if kind is None else kind)] * 3) for i in range(n)]
    return torch.from_numpy(np.stack(images))


@pytest.fixture(scope="module")
def gated_model():
    torch.manual_seed(0)
    model = ChestXrayClassifier(image_size=32, hidden_size=16).eval()
    report = fit_feature_gate(model, cached(60, 0, kind=None), cached(30, 500, kind=None), fpr=0.1)
    return model, report


def test_block_summaries_hold_the_mean_and_std_of_every_channel_of_each_block(tiny_model):
    summaries = block_summaries(tiny_model, cached(5, 0))
    assert [s.shape for s in summaries] == [(5, d) for d in feature_ood.block_dims(tiny_model.features)]
    assert feature_ood.block_dims(tiny_model.features) == [128, 256, 512, 1024, 1024]


def test_threshold_is_fitted_on_the_validation_scores_at_the_stated_rate(gated_model):
    model, report = gated_model
    assert model.config.feature_fpr == 0.1 and model.config.feature_threshold == report["threshold"] > 0
    assert report["validation_flagged_rate"] <= 0.1 + 1e-9
    val_scores = model.feature_scores([torch.from_numpy(x) for x in block_summaries(model, cached(30, 500, kind=None))])
    # 30 images at 10%: the ceil(31 * 0.9) = 28th smallest score
    assert float(np.sort(val_scores.numpy())[27]) == pytest.approx(report["threshold"], rel=1e-5)


def test_far_inputs_are_flagged_and_in_distribution_ones_mostly_not(gated_model):
    model, _ = gated_model
    xrays = [synthetic_xray(32, 32, seed=900 + i, kind=i % 3) for i in range(12)]  # drawn like the training images
    rng = np.random.default_rng(0)
    strangers = [rng.integers(0, 256, (32, 32), dtype=np.uint8), np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)),
                 ((np.indices((32, 32)).sum(0) // 4) % 2 * 255).astype(np.uint8)]
    inference = model.infer(xrays + strangers)
    scores = inference.feature_scores.numpy()
    threshold = model.config.feature_threshold
    assert (scores[:12] > threshold).mean() <= 0.25
    assert (scores[12:] > threshold).all(), scores[12:]
    prediction = model.predict(strangers[0])
    assert prediction.uncertain and any("unlike the training X-rays" in r for r in prediction.reasons)


def test_statistics_round_trip_through_safetensors_and_stay_fp32(gated_model, tmp_path):
    model, _ = gated_model
    model.save_pretrained(tmp_path / "m", weights_dtype=torch.float16)
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored["features.0.weight"].dtype == torch.float16
    assert all(v.dtype == torch.float32 for k, v in stored.items() if k.startswith(feature_ood.BUFFER_PREFIX))
    loaded = ChestXrayClassifier.from_pretrained(tmp_path / "m")
    assert loaded.config.feature_threshold == model.config.feature_threshold
    image = synthetic_xray(64, 64, seed=3)
    a, b = model.infer([image]).feature_scores, loaded.infer([image]).feature_scores
    assert a is not None and torch.allclose(a, b, rtol=1e-3)


def test_a_model_without_statistics_has_no_feature_gate(tiny_model, tmp_path):
    assert tiny_model.infer([synthetic_xray(64, 64)]).feature_scores is None
    tiny_model.save_pretrained(tmp_path / "m")
    assert not any(k.startswith(feature_ood.BUFFER_PREFIX) for k in load_file(str(tmp_path / "m" / "model.safetensors")))


def test_a_bf16_feature_pass_gives_the_fp32_summaries_to_bf16_precision(tiny_model):
    """Training fits the gate in bf16 where that is the run's precision: the summaries must agree."""
    images = cached(6, 0, kind=None)
    fp32 = block_summaries(tiny_model, images)
    bf16 = block_summaries(tiny_model, images, precision="bf16")
    for a, b in zip(fp32, bf16):
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * float(np.abs(a).mean()))
    assert not all(np.array_equal(a, b) for a, b in zip(fp32, bf16)), "the bf16 pass did not run in bf16"


def test_the_gate_fitted_on_kept_validation_summaries_is_the_gate_fitted_on_the_images():
    torch.manual_seed(0)
    model = ChestXrayClassifier(image_size=32, hidden_size=16).eval()
    train, val = cached(40, 0, kind=None), cached(20, 500, kind=None)
    from_images = fit_feature_gate(model, train, val, fpr=0.1)
    kept = [torch.from_numpy(x) for x in block_summaries(model, val)]
    assert fit_feature_gate(model, train, kept, fpr=0.1)["threshold"] == pytest.approx(from_images["threshold"], rel=1e-6)


def test_scores_follow_statistics_loaded_or_refitted_after_a_first_call():
    # The float64 copies of the statistics are kept between calls; they must not outlive the buffers.
    torch.manual_seed(0)
    first, second = (ChestXrayClassifier(image_size=32, hidden_size=16).eval() for _ in range(2))
    fit_feature_gate(first, cached(40, 0, kind=None), cached(20, 500, kind=None), fpr=0.1)
    fit_feature_gate(second, cached(40, 900, kind=1), cached(20, 1500, kind=1), fpr=0.1)
    summaries = [torch.from_numpy(x) for x in block_summaries(first, cached(6, 3000, kind=None))]

    def from_the_buffers(model):
        p = feature_ood.BUFFER_PREFIX
        return feature_ood.scores(summaries, [getattr(model, f"{p}mean_{b}") for b in range(5)],
                                  [getattr(model, f"{p}precision_{b}") for b in range(5)], getattr(model, f"{p}scale"))

    before = first.feature_scores(summaries)
    torch.testing.assert_close(before, from_the_buffers(first))
    first.load_state_dict(second.state_dict())  # in place: the same tensors, new values
    after = first.feature_scores(summaries)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, from_the_buffers(second))
    fit_feature_gate(first, cached(40, 0, kind=None), cached(20, 500, kind=None), fpr=0.1)  # refitted: new buffers
    refitted = first.feature_scores(summaries)
    assert not torch.allclose(refitted, after)
    torch.testing.assert_close(refitted, from_the_buffers(first))


def test_block_units_are_what_unseen_images_give_not_the_training_images_own_distances():
    # Fewer images than dimensions, as in training: in-sample distances understate unseen ones.
    rng = np.random.default_rng(0)
    dims = 96
    spread = np.linspace(0.2, 3.0, dims)
    train, unseen = rng.normal(size=(120, dims)) * spread, rng.normal(size=(2000, dims)) * spread
    means, precisions, scales = feature_ood.fit_statistics([train])
    unseen_p99 = np.quantile(feature_ood._distances(unseen, means[0], precisions[0]), feature_ood.TRAIN_QUANTILE)
    in_sample_p99 = np.quantile(feature_ood._distances(train, means[0], precisions[0]), feature_ood.TRAIN_QUANTILE)
    assert in_sample_p99 < 0.85 * unseen_p99  # the bias the out-of-fold units remove
    assert scales[0] == pytest.approx(unseen_p99, rel=0.15)


def test_too_few_training_images_to_hold_out_fall_back_to_in_sample_units():
    x = np.random.default_rng(1).normal(size=(6, 8))
    means, precisions, scales = feature_ood.fit_statistics([x])
    assert scales[0] == pytest.approx(np.quantile(feature_ood._distances(x, means[0], precisions[0]), feature_ood.TRAIN_QUANTILE))


def test_with_labels_the_validation_flags_are_counted_per_class(gated_model):
    model, _ = gated_model
    val = cached(30, 500, kind=None)
    labels = [i % 3 for i in range(30)]  # the kind each cached image was drawn with
    report = fit_feature_gate(model, cached(60, 0, kind=None), val, fpr=0.1, val_labels=labels)
    scores = model.feature_scores([torch.from_numpy(x) for x in block_summaries(model, val)]).numpy()
    flagged = scores > report["threshold"]
    expected = {name: {"flagged": int(flagged[np.array(labels) == c].sum()), "n": 10} for c, name in enumerate(model.class_names)}
    assert report["validation_flagged_by_class"] == expected
    assert sum(row["flagged"] for row in expected.values()) == round(report["validation_flagged_rate"] * 30) > 0
    assert "validation_flagged_by_class" not in fit_feature_gate(model, cached(60, 0, kind=None), val, fpr=0.1)


@pytest.mark.parametrize(("n", "fpr", "rank"), [(81, 0.02, 81), (99, 0.05, 95), (99, 0.01, 99), (400, 0.02, 393)])
def test_the_threshold_is_the_split_conformal_rank_of_the_validation_scores(n, fpr, rank):
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))  # the k-th smallest score is k
    assert feature_ood.fit_threshold(scores, fpr) == rank


def test_a_new_xray_like_the_validation_ones_exceeds_the_threshold_at_most_at_the_stated_rate():
    # Exchangeable draws: the share of fresh scores above each fitted threshold, over many validation sets.
    # At the k-th smallest of n it is (n + 1 - k) / (n + 1) exactly: 4/82 = 0.0488 here (the interpolated
    # 95th percentile: about 0.06). The standard error over these trials is about 0.0006.
    rng = np.random.default_rng(0)
    n, fpr, trials = 81, 0.05, 4000
    exceeded = [(rng.gamma(2.0, size=50) > feature_ood.fit_threshold(rng.gamma(2.0, size=n), fpr)).mean() for _ in range(trials)]
    assert np.mean(exceeded) == pytest.approx(4 / 82, abs=0.003)
    assert 4 / 82 <= fpr


def test_too_few_validation_images_for_the_rate_use_the_largest_score_and_say_so(caplog):
    with caplog.at_level("WARNING", logger="chest_model.feature_ood"):
        assert feature_ood.fit_threshold([0.3, 0.9, 0.5], 0.02) == 0.9
    assert "3 validation images are too few" in caplog.text and "25.0%" in caplog.text
    assert feature_ood.bounded_rate(3, 0.02) == 0.25 and feature_ood.bounded_rate(81, 0.02) == 0.02


def test_the_rate_stored_with_a_gate_fitted_on_too_few_images_is_the_one_they_bound():
    torch.manual_seed(0)
    model = ChestXrayClassifier(image_size=32, hidden_size=16).eval()
    report = fit_feature_gate(model, cached(20, 0, kind=None), cached(9, 500, kind=None), fpr=0.02)
    assert report["fpr"] == model.config.feature_fpr == 0.1 and report["rule"] == "split-conformal"


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_a_rate_outside_zero_and_one_is_refused(fpr):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        feature_ood.fit_threshold([0.3, 0.9, 0.5], fpr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casting_the_model_keeps_the_gate_statistics_fp32(gated_model, dtype):
    model, _ = gated_model
    cast = ChestXrayClassifier(model.config).eval()
    cast._register_feature_buffers()
    cast.load_state_dict(model.state_dict())
    cast.to(dtype)
    statistics = {k: v for k, v in cast.state_dict().items() if k.startswith(feature_ood.BUFFER_PREFIX)}
    assert statistics and all(v.dtype == torch.float32 for v in statistics.values())
    assert next(cast.parameters()).dtype == dtype
    for name, value in statistics.items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0)
    summaries = [torch.from_numpy(x) for x in block_summaries(model, cached(8, 500, kind=None))]
    torch.testing.assert_close(cast.feature_scores(summaries), model.feature_scores(summaries), rtol=0, atol=0)
