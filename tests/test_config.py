"""Config: schema <- YAML <- overrides; every kind of mistake stops with one line naming the key."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, TINY_YAML

from cycle.config import ConfigError, RunConfig, fingerprint, load_config, save_config


def test_tiny_and_demo_configs_load():
    cfg = load_config(TINY_YAML)
    assert isinstance(cfg, RunConfig) and cfg.name == "tiny"
    assert cfg.data.emoji.n_train == 200 and cfg.train.batch_size == 32
    for path in (REPO / "configs").glob("*.yaml"):
        load_config(path)


def test_overrides_apply_with_types():
    cfg = load_config(TINY_YAML, ["train.epochs=5", "loss.hni_mode=pair", "eval.templates=['a {}']", "name=x"])
    assert cfg.train.epochs == 5 and cfg.loss.hni_mode == "pair" and cfg.eval.templates == ["a {}"]
    assert cfg.name == "x"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.epochz=3"], "config key 'train.epochz': Key 'epochz' not in 'TrainConfig'. Did you mean: 'epochs'?"),
        (["train.epochs=abc"], "config key 'train.epochs'"),
        (["train.epochs=0"], "config key 'train.epochs': got 0, expected >= 1"),
        (["loss.hni_mode=foo"], "config key 'loss.hni_mode': got 'foo', expected one of batch, pair"),
        (["loss.long_text_prob=1.5"], "config key 'loss.long_text_prob': got 1.5, expected a probability"),
        (["data.emoji.alt_noise.generic=0.9"], "config key 'data.emoji.alt_noise': rates sum to"),
        (["train"], "override 'train': expected key=value"),
        (["lvlm.lora.r=[1,2]"], "config key 'lvlm.lora.r'"),
    ],
)
def test_each_kind_of_mistake_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_YAML, overrides)
    message = str(err.value)
    assert message.startswith(expected.split(":")[0]) and expected in message
    assert "\n" not in message


def test_missing_required_value_and_file(tmp_path):
    with pytest.raises(ConfigError, match="config key 'name': a value is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_typo_in_yaml_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "loss": {"hni_wieght": 1.0}}))
    with pytest.raises(ConfigError, match=r"config key 'loss.hni_wieght'.*Did you mean.*'hni_weight'"):
        load_config(bad)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    a, b = load_config(TINY_YAML), load_config(TINY_YAML)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a.loss) != fingerprint(load_config(TINY_YAML, ["loss.hni_weight=0.5"]).loss)
    assert fingerprint(a.train) == fingerprint(load_config(TINY_YAML, ["loss.hni_weight=0.5"]).train)
    fp = save_config(a, tmp_path / "run")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith(f"# fingerprint: {fp}") and fp == fingerprint(a)
    assert load_config(tmp_path / "run" / "config.yaml") == a


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lvlm.carry.sft_epochs=0"], r"'lvlm.carry.sft_epochs': got 0, expected >= 1 or null"),
        (
            ["lvlm.carry.enabled=true", "lvlm.lora.enabled=true", "lvlm.sft_save=adapter"],
            r"'lvlm.carry.enabled': carrying the annotator needs merged SFT outputs",
        ),
    ],
)
def test_carry_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_YAML, ["name=x", *overrides])


def test_carried_stage_replaces_only_the_epochs():
    from cycle.config import carried_stage

    cfg = load_config(TINY_YAML, ["name=x", "lvlm.carry.sft_epochs=3"])
    carried = carried_stage(cfg, "sft")
    assert carried.lvlm.sft.epochs == 3 and carried.lvlm.sft.lr == cfg.lvlm.sft.lr
    assert cfg.lvlm.sft.epochs == 12 and carried_stage(cfg, "align") is cfg
