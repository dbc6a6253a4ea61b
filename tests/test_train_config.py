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
