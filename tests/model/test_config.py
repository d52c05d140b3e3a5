import pytest

from rematch.config import Config, ConfigError, ModelConfig, apply_overrides, dump_yaml, load_config


def test_defaults_live_in_one_place():
    assert Config().model == ModelConfig()
    assert ModelConfig().num_tokens == 16 and ModelConfig().pooling == "mean"


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_tokens: 4\n  tiny_size: small\n")
    config = load_config(path, ["model.num_tokens=8", "model.pooling=last"])
    assert config.model.num_tokens == 8
    assert config.model.tiny_size == "small"
    assert config.model.pooling == "last"


def test_round_trip_through_yaml(tmp_path):
    config = apply_overrides(Config(), {"model.num_tokens": 2, "model.max_pixels": 200704})
    dump_yaml(config, tmp_path / "dump.yaml")
    assert load_config(tmp_path / "dump.yaml") == config


def test_unknown_key_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_token'.*num_tokens"):
        apply_overrides(Config(), ["model.num_token=3"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="expects an integer"):
        apply_overrides(Config(), ["model.num_tokens=many"])


def test_invalid_combination_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="pooling=last"):
        load_config(None, ["model.num_tokens=0", "model.pooling=mean"])


def test_scientific_notation_is_a_number():
    config = apply_overrides(Config(), ["train.lr=1e-4", "loss.temperature=2e-2"])
    assert config.train.lr == 1e-4 and config.loss.temperature == 0.02


def test_train_and_pretrain_share_one_train_section():
    """``rematch train`` and ``rematch pretrain`` derive their ``train`` sections from one base:
    a shared setting means the same and fails the same way in both, with each command's defaults."""
    import dataclasses

    from rematch.config import LoopConfig, TrainConfig
    from rematch.training.pretrain import PretrainConfig, PretrainTrainConfig

    shared = {field.name for field in dataclasses.fields(LoopConfig)}
    for section in (TrainConfig, PretrainTrainConfig):
        assert issubclass(section, LoopConfig) and shared <= {field.name for field in dataclasses.fields(section)}
    assert (TrainConfig().lr, PretrainTrainConfig().lr) == (1e-4, 1e-3)
    for root in (Config, PretrainConfig):
        with pytest.raises(ConfigError, match="train.log_every must be >= 1, got 0"):
            load_config(None, ["train.log_every=0"], cls=root)
