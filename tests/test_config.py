"""Config validation: unknown keys name the closest valid key, missing files name the path."""

import pytest

from vlp.config import ConfigError, build_config, dump_config, load_config


def test_shipped_configs_load():
    for name in ["albef_tiny", "albef_base", "demo"]:
        cfg = load_config(name)
        assert cfg.model.vision.image_size in (64, 224)
    assert load_config("albef_base").model.vision.width == 768
    assert load_config("albef_base").model.vision.depth == 12


def test_overrides_are_typed():
    cfg = build_config({"model": "tiny"}, ["train.lr=3e-4", "train.steps=7", "train.tensorboard=false"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7 and cfg.train.tensorboard is False


def test_model_size_with_overrides():
    cfg = build_config({"model": {"size": "tiny", "vision": {"depth": 1}}})
    assert cfg.model.vision.depth == 1 and cfg.model.vision.width == 128


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes'; did you mean 'train\.steps'"):
        build_config({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"did you mean 'method\.mlm_prob'"):
        build_config({}, ["method.mlm_prb=0.2"])
    with pytest.raises(ConfigError, match=r"unknown model size 'tinny'.*did you mean 'tiny'"):
        build_config({"model": "tinny"})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        build_config({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="key=value"):
        build_config({}, ["train.steps"])


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(missing)


def test_dump_roundtrip(tmp_path):
    cfg = load_config("albef_tiny", ["train.steps=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
