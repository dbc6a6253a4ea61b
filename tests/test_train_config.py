"""train.py's arguments parse into a typed, frozen config whose fields are exactly the parser's."""
import dataclasses

import pytest

from chest_model.train_config import TrainingConfig, get_args_parser, parse_config


def test_the_defaults_are_the_tutorials_and_typed():
    config = parse_config(["--data-dir", "DATA/train", "--output-dir", "runs/x"])
    assert isinstance(config, TrainingConfig)
    assert (config.lr, config.momentum, config.batch_size, config.image_size) == (1e-3, 0.9, 4, 224)
    assert config.data_dir == ["DATA/train"] and config.external_dir == [] and config.sampling == "shuffle"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1


def test_repeated_sources_and_aliases_parse():
    config = parse_config(["--data-dir", "a=A", "--data-dir", "b=B", "--output-dir", "o", "--no-augment",
                           "--sampling", "groups", "--external-dir", "c=C"])
    assert config.data_dir == ["a=A", "b=B"] and config.augment == "none" and config.external_dir == ["c=C"]
    assert config.scalars()["sampling"] == "groups" and "data_dir" not in config.scalars()  # lists are not hyperparameters


def test_every_parser_option_is_a_config_field_and_back():
    dests = {a.dest for a in get_args_parser()._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainingConfig)}


def test_a_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data-dir", "d", "--output-dir", "o", "--sampling", "sources"])
    assert exit_info.value.code == 2 and "invalid choice: 'sources'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--balance-by", "view", "--metadata", "m.csv"], "--balance-by weighs the draws of a sampler: give --sampling"),
    (["--balance-by", "view", "--sampling", "within-source"], "--balance-by view needs the CSV that holds that column"),
    (["--metadata", "m.csv", "--sampling", "within-source"], "--metadata is read for --balance-by only"),
])
def test_balance_by_needs_a_sampler_and_its_csv(extra, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data-dir", "d", "--output-dir", "o", *extra])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_balance_by_parses_and_its_csvs_are_part_of_the_recipe():
    config = parse_config(["--data-dir", "d", "--output-dir", "o", "--sampling", "within-source", "--balance-by", "view",
                           "--metadata", "a/manifest.csv", "--metadata", "b.csv"])
    assert config.balance_by == "view" and config.metadata == ["a/manifest.csv", "b.csv"]
    recipe = config.recipe()
    assert recipe["balance_by"] == "view" and all(path.startswith("/") for path in recipe["metadata"])


@pytest.mark.parametrize("flag, value, says", [
    ("--epochs", "0", "argument --epochs: must be at least 1, got 0"),
    ("--batch-size", "-2", "argument --batch-size: must be at least 1"),
    ("--grad-accum", "0", "argument --grad-accum: must be at least 1"),
    ("--image-size", "16", "argument --image-size: must be at least 32"),
    ("--ood-fpr", "1", "argument --ood-fpr: must lie strictly between 0 and 1"),
    ("--ood-fpr", "-0.1", "argument --ood-fpr: must lie strictly between 0 and 1"),
    ("--lr", "nan", "argument --lr: must be 0 or more"),
    ("--warmup-epochs", "-1", "argument --warmup-epochs: must be 0 or more"),
    ("--checkpointing-steps", "abc", "argument --checkpointing-steps: expected 'epoch', 'none' or a number of batches"),
    ("--checkpointing-steps", "0", "argument --checkpointing-steps: expected 'epoch', 'none' or a number of batches"),
    ("--checkpoints-total-limit", "-1", "argument --checkpoints-total-limit: must be at least 0"),
    ("--num-workers", "x", "argument --num-workers: expected a whole number, got 'x'"),
    ("--dropout", "1", "--dropout must be in [0, 1), got 1.0"),
])
def test_a_value_that_cannot_train_is_refused_before_any_work(capsys, flag, value, says):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data-dir", "d", "--output-dir", "o", flag, value])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_checkpointing_steps_keep_their_words_and_numbers():
    parse = lambda value: parse_config(["--data-dir", "d", "--output-dir", "o", "--checkpointing-steps", value])
    assert [parse(v).checkpointing_steps for v in ("epoch", "none", "25")] == ["epoch", "none", "25"]


@pytest.mark.parametrize("value, says", [("bogus", "unknown tracker 'bogus'; choose none, all or one of aim, "),
                                         ("wandb", "wandb is not installed (pip install wandb); installed: tensorboard")])
def test_a_tracker_that_cannot_log_is_refused_before_any_work(capsys, value, says):
    from accelerate.tracking import get_available_trackers

    if value == "wandb" and [str(getattr(t, "value", t)) for t in get_available_trackers()] != ["tensorboard"]:
        pytest.skip("this test expects tensorboard, and only it, among the trackers installed (the dev extras)")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data-dir", "d", "--output-dir", "o", "--report-to", value])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err
    assert parse_config(["--data-dir", "d", "--output-dir", "o", "--report-to", "TensorBoard"]).report_to == "tensorboard"
