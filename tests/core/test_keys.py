"""Every config field changes exactly the cache keys it should: each field is either in a key
or listed in keys.NO_KEY with the reason it cannot change a cached result."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel, ValidationError

from kdnas_core.config import KDNASConfig
from kdnas_core.keys import KEYS, NO_KEY, NOT_SEARCH, key


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += leaf_fields(annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def candidates(value, annotation) -> list:
    """Other values a field could take; the first one the config accepts is used."""
    args = typing.get_args(annotation)
    literals = [a for a in args if not isinstance(a, type)] if typing.get_origin(annotation) is typing.Literal else []
    if value is None:  # an optional Literal (Literal[...] | None): its literals
        literals += [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    if literals:
        return [v for v in literals if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, (int, float)):
        return [value + 1, value / 2, value * 2, value - 1, 0.5]
    if isinstance(value, str):
        return [value + "-other", "s3://kdnas-bucket/other", "gelu", "ort-int8"]
    if isinstance(value, list):
        return ([value[:1], value + value[-1:], [[2, 64]], ["ort-int8", "ort-fp32"], ["1ms"]] if value
                else [["x"], [{"source": "wordnet"}]])
    if value is None:
        return [3, 0.1, "s3://kdnas-bucket/x", "tcp://127.0.0.1:8786", "other", 1000, {"epochs": 1}, {"test_size": 7}, False]
    if isinstance(value, dict):
        return [{**value, "GPU": 1}, {"GPU": 1}]
    return []


# Fields whose other values are only valid together with another field (dotted), which then
# moves the keys of its own section too.
ALSO = {"latency.reward_backend": {"latency.backends": ["ort-fp32", "ort-int8"]},
        "search_space.cap_to_teacher": {"student.init": "random"},
        "data.source_column": {"data.source": "csv"},
        "data.translation_targets": {"data.source": "messages"},
        "data.mix": {"data.source": "mix"},
        "distill.proxy.patience": {"distill.proxy.eval_every": 10},
        "distill.final.patience": {"distill.final.eval_every": 10},
        "search.screen": {"search.candidates_per_episode": 1},
        "distill.batching": {"distill.weights.pooled_relation": 0.2},
        "distill.proxy.batching": {"distill.proxy.pooled_relation": 0.2},
        "distill.final.batching": {"distill.final.pooled_relation": 0.2}}


def changed(field: str) -> KDNASConfig:
    base = KDNASConfig().model_dump(mode="json")
    section, *rest = field.split(".")
    model = KDNASConfig
    for part in field.split(".")[:-1]:
        model = model.model_fields[part].annotation
    annotation = model.model_fields[field.split(".")[-1]].annotation
    for value in candidates(get(base, field), annotation):
        data = KDNASConfig().model_dump(mode="json")
        node = data
        for part in field.split(".")[:-1]:
            node = node[part]
        node[field.split(".")[-1]] = value
        for dotted, other in ALSO.get(field, {}).items():
            *parents, name = dotted.split(".")
            parent = data
            for part in parents:
                parent = parent[part]
            parent[name] = other
        try:
            cfg = KDNASConfig.model_validate(data)
        except ValidationError:
            continue
        section = field.split(".")[0]
        # a value that hashes as the default does (distill.precision "fp32" where "auto" resolves to fp32) is no change
        if cfg.section_hash(section) != KDNASConfig().section_hash(section):
            return cfg
    raise AssertionError(f"no other valid value found for {field}")


def expected_keys(field: str) -> set[str]:
    out = set()
    for name, k in KEYS.items():
        in_section = field.split(".")[0] in k.sections
        excluded = any(field == e or field.startswith(e + ".") for e in k.exclude)
        if in_section and not excluded:
            out.add(name)
    return out


FIELDS = leaf_fields(KDNASConfig)


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_moves_exactly_the_keys_that_depend_on_it(field):
    base, cfg = KDNASConfig(), changed(field)
    moved = {name for name in KEYS if key(name, cfg) != key(name, base)}
    expected = expected_keys(field).union(*(expected_keys(other) for other in ALSO.get(field, {})))
    assert moved == expected, field
    if not moved:
        assert field.split(".")[0] in NO_KEY, f"{field} is in no cache key: add it to one, or to keys.NO_KEY with a reason"


def test_the_table_is_complete_and_has_no_stale_entries():
    sections = set(KDNASConfig.model_fields)
    keyed = {s for k in KEYS.values() for s in k.sections}
    assert keyed | set(NO_KEY) == sections and not keyed & set(NO_KEY)
    for k in KEYS.values():
        for dotted in k.exclude:
            assert dotted in FIELDS or any(f.startswith(dotted + ".") for f in FIELDS), dotted


def test_a_new_final_budget_reuses_the_search_but_not_the_final_students():
    base = KDNASConfig()
    longer = KDNASConfig.model_validate({"distill": {"final": {"epochs": 3}}})
    assert key("search", longer) == key("search", base) and key("proxy", longer) == key("proxy", base)
    assert key("final", longer) != key("final", base)
    assert "distill.final" in NOT_SEARCH
    more_processes = KDNASConfig.model_validate({"distill": {"world_size": 2}})
    assert key("final", more_processes) == key("final", base)


def test_a_new_recipe_retrains_but_keeps_what_training_does_not_produce(monkeypatch):
    import kdnas_core.keys as keys

    cfg = KDNASConfig()
    before = {name: key(name, cfg) for name in KEYS}
    monkeypatch.setattr(keys, "RECIPE", keys.RECIPE + 1)
    moved = {name for name in KEYS if key(name, cfg) != before[name]}
    assert moved == {"proxy", "final", "checkpoint", "search"}


def test_fields_added_later_leave_the_keys_of_configs_that_keep_their_defaults():
    """Searches and students keyed before a field existed stay valid while it holds its default."""
    import hashlib
    import json

    from kdnas_core.config import ADDED_LATER

    cfg = KDNASConfig(distill={"precision": "fp32"})  # what "auto" is on a machine without bf16 units
    payload = {s: getattr(cfg, s).model_dump(mode="json") for s in sorted({d.split(".")[0] for d in ADDED_LATER})}
    for dotted in ADDED_LATER:
        *parents, name = dotted.split(".")
        node = payload
        for part in parents:
            node = node[part]
        node.pop(name)
    for section in payload:
        before = hashlib.sha1(json.dumps({section: payload[section]}, sort_keys=True).encode()).hexdigest()[:12]
        assert cfg.section_hash(section) == before
    before = hashlib.sha1(json.dumps({"data": payload["data"]}, sort_keys=True).encode()).hexdigest()[:12]
    assert changed("data.translation_targets").section_hash("data") != before
    before = hashlib.sha1(json.dumps({"distill": payload["distill"]}, sort_keys=True).encode()).hexdigest()[:12]
    assert changed("distill.final.eval_every").section_hash("distill") != before


def test_the_default_configs_keys_do_not_move_when_a_field_is_added():
    """Golden keys of the default config (fp32, paths aside): a new config field that is not in
    ADDED_LATER changes every key whose sections hold it, and every user's searches and students
    would silently retrain. Change these values only with a deliberate RECIPE or version bump."""
    cfg = KDNASConfig(distill={"precision": "fp32"})
    golden = {"proxy": "caa770b3f357", "latency": "afa3d02f5bd2", "latency_settings": "2be20e834519",
              "final": "abeeb2ff9e52", "checkpoint": "7020f6ff8e19", "search": "947dde53cbe3"}
    assert {name: key(name, cfg) for name in golden} == golden


def test_precision_auto_is_keyed_as_what_it_resolves_to(monkeypatch):
    """distill.precision: auto trains in bf16 where the hardware has bf16 units and in fp32
    elsewhere; its cache keys are those of the explicit setting it resolves to, so an fp32 machine
    keeps every key it had."""
    from kdnas_core import hardware

    auto = KDNASConfig(distill={"precision": "auto"})
    hashes = {}
    for native, resolved in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "native_bf16", lambda device, native=native: native)
        explicit = KDNASConfig(distill={"precision": resolved})
        assert hardware.precision_name("auto", auto.distill.device) == resolved
        assert auto.section_hash("distill") == explicit.section_hash("distill")
        hashes[resolved] = explicit.section_hash("distill")
    assert hashes["fp32"] == KDNASConfig().section_hash("distill") != hashes["bf16"]
