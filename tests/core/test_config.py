import warnings
from pathlib import Path

import pytest

from kdnas_core.config import KDNASConfig, config_from_dict, load_config
from kdnas_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, KDNASConfig)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "benchmark.yaml", "multilingual.yaml"}


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_field_names_its_path_and_the_allowed_fields(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "distill:\n  learning_rate: 0.1\n"))
    msg = str(err.value)
    assert "distill.learning_rate" in msg and "unknown field" in msg and "lr" in msg
    assert "\n" not in msg


def test_bad_value_names_field_value_and_rule(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "distill:\n  lr: -1\n"))
    msg = str(err.value)
    assert "distill.lr" in msg and "-1" in msg and "greater than 0" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.mapping.*'uniform'"):
        load_config(write(tmp_path, "distill:\n  mapping: diagonal\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_config_is_frozen_and_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 3\n"), {"distill.lr": 1e-3, "data.batch_size": 8})
    assert cfg.seed == 3 and cfg.distill.lr == 1e-3 and cfg.data.batch_size == 8
    with pytest.raises(Exception):
        cfg.seed = 4  # type: ignore[misc]


def test_section_hash_tracks_only_named_sections(tmp_path):
    a = load_config(write(tmp_path, "seed: 1\n"))
    b = load_config(write(tmp_path, "seed: 2\ndistill: {lr: 0.001}\n"))
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("distill") != b.section_hash("distill")


def test_the_final_budget_does_not_change_the_search_folder():
    from kdnas_core.config import KDNASConfig
    from kdnas_core.search.runner import search_dir

    base = KDNASConfig()
    longer_final = KDNASConfig.model_validate({"distill": {"final": {"epochs": 5}, "checkpoint_every": 10}})
    other_recipe = KDNASConfig.model_validate({"distill": {"lr": 1e-3}})
    assert search_dir(longer_final) == search_dir(base)
    assert search_dir(other_recipe) != search_dir(base)


@pytest.mark.parametrize("field, value", [("export.teacher_space", True), ("data.translation_targets", True)])
def test_settings_that_need_the_pooled_term_say_so_when_it_is_off(field, value):
    section, name = field.split(".")
    data = {section: {name: value}, "distill": {"weights": {"pooled_cosine": 0.0}}}
    if field == "data.translation_targets":
        data["data"]["source"] = "messages"
    with pytest.raises(ConfigError, match=rf"{field} = true .* set distill.weights.pooled_cosine > 0") as err:
        config_from_dict(data)
    assert "\n" not in str(err.value)


def test_the_relation_term_without_the_pooled_term_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"distill.weights .* pooled_relation > 0 .* set pooled_cosine > 0") as err:
        config_from_dict({"distill": {"weights": {"pooled_relation": 1.0, "pooled_cosine": 0.0}}})
    assert "\n" not in str(err.value)


def test_neighbour_batching_without_the_relation_term_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"distill.* batching: neighbours .* set weights.pooled_relation > 0") as err:
        config_from_dict({"distill": {"batching": "neighbours"}})
    assert "\n" not in str(err.value)


def test_a_paths_recipe_overrides_the_relation_weight_and_batching_and_checks_them_in_one_line():
    d = config_from_dict({"distill": {"final": {"pooled_relation": 0.2, "batching": "neighbours"}}}).distill
    assert (d.recipe("final").weights.pooled_relation, d.recipe("final").batching) == (0.2, "neighbours")
    assert d.recipe("proxy") == d and (d.weights.pooled_relation, d.batching) == (0.0, "length")
    for bad, match in (({"final": {"batching": "neighbours"}}, r"distill.* final.batching: neighbours .* set weights"),
                       ({"batching": "neighbours", "weights": {"pooled_relation": 0.2}, "proxy": {"pooled_relation": 0}},
                        r"distill.* batching: neighbours .* \(or proxy.pooled_relation\)"),
                       ({"weights": {"pooled_cosine": 0}, "final": {"pooled_relation": 0.2}},
                        r"distill.* final.pooled_relation > 0 .* set weights.pooled_cosine > 0")):
        with pytest.raises(ConfigError, match=match) as err:
            config_from_dict({"distill": bad})
        assert "\n" not in str(err.value)


def test_a_paths_hidden_weight_overrides_the_shared_one_and_a_path_with_no_term_is_a_one_line_error():
    d = config_from_dict({"distill": {"final": {"hidden_mse": 0}}}).distill
    assert (d.recipe("final").weights.hidden_mse, d.recipe("proxy").weights.hidden_mse) == (0, 1.0)
    assert d.recipe("final").weights.pooled_cosine == d.weights.pooled_cosine
    for bad, field in (({"weights": {"pooled_cosine": 0}, "final": {"hidden_mse": 0}}, "final.hidden_mse"),
                       ({"weights": {"pooled_cosine": 0, "hidden_mse": 0}}, "weights.hidden_mse")):
        with pytest.raises(ConfigError, match=rf"distill.* {field} = 0 .* leaves the \w+ distillation nothing to learn") as err:
            config_from_dict({"distill": bad})
        assert "\n" not in str(err.value)


def test_random_init_students_with_the_cut_students_final_recipe_are_warned():
    cut_recipe = {"final": {"pooled_relation": 0.2, "batching": "neighbours"}}
    with pytest.warns(UserWarning, match="student.init: random with the relation term over batches of neighbours"):
        config_from_dict({"student": {"init": "random"}, "distill": cut_recipe})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict({"distill": cut_recipe})


def test_apply_overrides_returns_a_new_dict_and_leaves_its_input_alone():
    """Set in place, one benchmark recipe once inherited the keys of the recipes before it."""
    from kdnas_core.config import apply_overrides

    raw = {"distill": {"lr": 1e-4, "weights": {"pooled_cosine": 5.0}}}
    first = apply_overrides(raw, {"distill.weights.pooled_cosine": 1.0, "seed": 3})
    second = apply_overrides(raw, {"distill.lr": 2e-4})
    assert raw == {"distill": {"lr": 1e-4, "weights": {"pooled_cosine": 5.0}}}
    assert first == {"distill": {"lr": 1e-4, "weights": {"pooled_cosine": 1.0}}, "seed": 3}
    assert second == {"distill": {"lr": 2e-4, "weights": {"pooled_cosine": 5.0}}}


@pytest.mark.parametrize("overrides,says", [
    ({"search": {"screen": 2, "candidates_per_episode": 4}}, "search.screen = 2 screens fewer candidates"),
    ({"search": {"screen": 200}, "student": {"init": "random"}}, "set student.init: teacher"),
    ({"reward": {"quality": "translation_r1"}}, "reward.quality = 'translation_r1' needs translation pairs in the corpus"),
    ({"search": {"screen_signal": "translation_r1"}}, "search.screen_signal = 'translation_r1' needs translation pairs"),
    ({"reward": {"quality": "cosine"}, "distill": {"weights": {"pooled_cosine": 0}}}, "pooled-cosine loss term"),
    ({"search": {"screen_signal": "hidden_last"}, "distill": {"weights": {"hidden_mse": 0}}}, "loss of the last layer"),
])
def test_quality_signals_and_the_screen_refuse_what_they_cannot_read_in_one_line(overrides, says):
    with pytest.raises(ConfigError) as err:
        config_from_dict(overrides, "x.yaml")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_default_search_and_reward_keep_their_folder_and_keys():
    """search.screen, search.screen_signal and reward.quality came after searches were keyed: at
    their defaults they leave every search folder where it was."""
    base = KDNASConfig()
    same = config_from_dict({"search": {"screen": 0, "screen_signal": "recall10"}, "reward": {"quality": "hidden"}}, "x")
    assert base.section_hash("search", "reward") == same.section_hash("search", "reward")
    assert KDNASConfig(reward={"quality": "recall10"}).section_hash("reward") != base.section_hash("reward")
