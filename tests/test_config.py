"""Config validation: unknown keys name the closest valid key, missing files name the path; the `method`
section is a tagged union on `method.name` (each method's own section class, `vlp.methods`)."""

import pytest

from pathlib import Path

import vlp.methods  # noqa: F401  (registers the shipped methods' config sections)
from vlp.config import METHOD_CONFIGS, ConfigError, MethodConfig, build_config, dump_config, load_config
from vlp.methods import METHODS

LEGACY = Path(__file__).parent / "data" / "legacy_v0_1"


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
        build_config({"method": {"name": "albef"}}, ["method.mlm_prb=0.2"])
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


def test_every_registered_method_has_its_own_section():
    assert set(METHOD_CONFIGS) == set(METHODS)
    for name, cls in METHODS.items():
        cfg = build_config({"method": {"name": name}})
        assert type(cfg.method) is cls.config_class and issubclass(cls.config_class, MethodConfig)
        assert cfg.method.name == name


def test_a_key_of_another_method_names_the_method_it_belongs_to():
    with pytest.raises(ConfigError, match=r"'method\.region_mask_prob' belongs to method 'cmal', not to method\.name "
                                          r"'albef'.*set method\.name: cmal"):
        load_config("albef_tiny", ["method.region_mask_prob=0.3"])
    with pytest.raises(ConfigError, match=r"'method\.queue_size' belongs to method 'albef'"):
        load_config("cmal_tiny", ["method.queue_size=16"])
    with pytest.raises(ConfigError, match=r"unknown method\.name 'albf'.*did you mean 'albef'"):
        build_config({"method": {"name": "albf"}})
    with pytest.raises(ConfigError, match=r"the method section needs a name"):
        build_config({"method": {"mlm_prob": 0.2}})


def test_sections_dump_only_their_own_keys():
    albef = dump_config(load_config("albef_tiny"))
    cmal = dump_config(load_config("cmal_tiny"))
    assert "queue_size" in albef and "region_mask_prob" not in albef
    assert "region_mask_prob" in cmal and "queue_size" not in cmal


@pytest.mark.parametrize("name", ["albef", "cmal"])
def test_v0_1_flat_method_dumps_still_load(name):
    """config.yaml of a v0.1 checkpoint holds every method's keys in one flat section; it loads, keeping the
    keys of its own method with their values (the v0.1 code ignored the others)."""
    path = LEGACY / name / "config.yaml"
    cfg = load_config(path)
    assert cfg.method.name == name and type(cfg.method) is METHODS[name].config_class
    if name == "albef":
        assert cfg.method.momentum_distill is True and cfg.method.queue_size == 32
    else:
        assert cfg.method.max_regions == 8
    partial = {"name": name, "mlm_prob": 0.2, "region_mask_prob": 0.3, "queue_size": 0}  # not a full v0.1 dump
    with pytest.raises(ConfigError, match="belongs to method"):
        build_config({"method": partial})


def test_a_run_without_a_method_section_is_refused_naming_the_methods(tmp_path):
    from vlp.pretrain import pretrain

    with pytest.raises(ConfigError, match=r"no method section: set method\.name \(one of albef, clip, cmal"):
        pretrain(build_config({}, [f"train.out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_a_changed_foreign_key_on_a_v0_1_dump_is_not_dropped_silently():
    """v0.1 dumps carry the other methods' keys at their defaults (dropped); a changed one is the error."""
    path = LEGACY / "albef" / "config.yaml"
    with pytest.raises(ConfigError, match=r"'method\.region_mask_prob' belongs to method 'cmal'"):
        load_config(path, ["method.region_mask_prob=0.2"])
    assert load_config(path, ["method.mlm_prob=0.2"]).method.mlm_prob == 0.2


def test_model_override_on_a_named_size_keeps_the_size():
    """`--set model.vision.depth=2` on `model: tiny` changes that key only (issue 14: it used to replace the
    size by a mapping of the override alone, silently building a model from the defaults)."""
    cfg = build_config({"model": "tiny"}, ["model.vision.depth=2"])
    tiny = build_config({"model": "tiny"})
    assert cfg.model.vision.depth == 2 and cfg.model.name == "tiny"
    assert cfg.model.init_std == tiny.model.init_std and cfg.model.text == tiny.model.text
    assert cfg.model.vision.width == tiny.model.vision.width
    assert build_config({}, ["model.text.depth=3"]).model.init_std == tiny.model.init_std  # default size: tiny


def test_overrides_never_write_into_the_callers_mapping():
    raw = {"model": {"size": "tiny", "text": {"depth": 1}}, "train": {"steps": 5}}
    build_config(raw, ["model.text.depth=3", "train.steps=7"])
    assert raw == {"model": {"size": "tiny", "text": {"depth": 1}}, "train": {"steps": 5}}


def test_a_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path, monkeypatch):
    """`--config demo` in a directory that holds a run folder `demo/` still means the shipped config."""
    (tmp_path / "albef_tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("albef_tiny").method.name == "albef"
