from pathlib import Path

import pytest

from acestep_dist.config import PrepConfig, TrainConfig, load_config, parse_overrides
from acestep_dist.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_typo_names_the_key_and_suggests_the_closest(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("learnig_rate: 3.0e-4\nlora_rank: 16\n")
    with pytest.raises(ConfigError) as error:
        load_config(TrainConfig, path)
    assert "'learnig_rate'" in str(error.value)
    assert "did you mean 'learning_rate'?" in str(error.value)
    assert str(path) in str(error.value)


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("learning_rate: 1.0e-4\nlora_rank: 8\n")
    config = load_config(TrainConfig, path, ["lora_rank=64", "validation_prompt=calm piano, 90 bpm", "use_rslora=true"])
    assert config.lora_rank == 64 and config.learning_rate == 1e-4
    assert config.validation_prompt == "calm piano, 90 bpm" and config.use_rslora is True
    with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):
        load_config(TrainConfig, None, ["lora_alpah=32"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora_rank=abc"], "lora_rank"),
        (["zero_stage=5"], "zero_stage"),
        (["learning_rate=-1"], "learning_rate"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_values_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PrepConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(PrepConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(PrepConfig, tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="min_duration"):
        load_config(PrepConfig, None, ["min_duration=300"])


def test_every_shipped_config_validates():
    train = sorted((CONFIGS / "train").glob("*.yaml"))
    prep = sorted((CONFIGS / "prep").glob("*.yaml"))
    assert len(train) >= 5 and prep
    for path in train:
        load_config(TrainConfig, path)
    for path in prep:
        load_config(PrepConfig, path)


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=hello world", "e=", "f=[1, 2]"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "hello world", "e": None, "f": [1, 2]
    }


def test_family_keys_are_accepted_while_reading_and_validated_by_their_family():
    """lyrics_embedder_* are ACE-Step 1.5's keys: a config reads them, the family checks them."""
    from acestep_dist.families import get

    config = load_config(TrainConfig, None, ["lyrics_embedder_lr=1e-5"])
    with pytest.raises(ConfigError, match="lyrics_embedder_train is false"):
        get("ace-step-1.5").options(config)
    options = get("ace-step-1.5").options(load_config(TrainConfig, None, ["lyrics_embedder_train=true"]))
    assert options.lyrics_embedder_train and options.lyrics_embedder_lr is None
    with pytest.raises(ConfigError, match=r"unknown key 'lyrics_embeder_train' \(did you mean 'lyrics_embedder_train'"):
        load_config(TrainConfig, None, ["lyrics_embeder_train=true"])
