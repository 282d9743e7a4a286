import random

import pytest

from kdnas_core.config import SearchSpaceConfig
from kdnas_core.errors import ArchError
from kdnas_core.search.space import SearchSpace, StudentArch, TeacherShape


def test_name_round_trip_and_stable_id():
    arch = StudentArch(4, 384, 6, 1536, "gelu")
    assert arch.name == "L4-H384-A6-F1536-gelu"
    assert StudentArch.from_name(arch.name) == arch
    assert StudentArch.from_dict(arch.to_dict()) == arch
    # sha1 of the canonical name: the same in every process and on every machine.
    assert arch.arch_id == "f068c9aa5a"
    assert StudentArch(4, 384, 6, 1536, "relu").arch_id != arch.arch_id


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=4, hidden=384, heads=5, ffn=1536), "not divisible"),
        (dict(layers=0, hidden=384, heads=6, ffn=1536), "arch.layers"),
        (dict(layers=4, hidden=384, heads=6, ffn=1536, activation="tanh"), "arch.activation"),
    ],
)
def test_invalid_archs_are_rejected(kwargs, match):
    with pytest.raises(ArchError, match=match):
        StudentArch(**kwargs)


def test_bad_name():
    with pytest.raises(ArchError, match="expected L<layers>"):
        StudentArch.from_name("four layers please")


def test_default_space_enumerates_valid_distinct_archs():
    space = SearchSpace(SearchSpaceConfig())
    archs = list(space)
    assert len(archs) == len(space) == len({a.arch_id for a in archs})
    # 5 layer counts x (5 heads for 384 + 5 for 768) x 7 FFN x 3 activations
    assert len(space) == 5 * 10 * 7 * 3
    assert all(a.hidden % a.heads == 0 for a in archs)


def test_sample_and_mutate_stay_inside_the_space():
    space = SearchSpace(SearchSpaceConfig(heads=[2, 4, 5, 6]))
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        a = space.sample(rng)
        b = space.mutate(a, rng)
        assert a in space and b in space and a != b
        assert sum(getattr(a, f) != getattr(b, f) for f in ("layers", "ffn", "activation")) <= 1
        seen.add(a.arch_id)
    assert len(seen) > 100  # sampling covers the space, not a corner of it


def test_sampling_is_seeded():
    space = SearchSpace(SearchSpaceConfig())
    draw = lambda seed: [space.sample(random.Random(seed)).name for _ in range(1)]  # noqa: E731
    assert draw(1) == draw(1)
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [space.sample(rng_a) for _ in range(20)] == [space.sample(rng_b) for _ in range(20)]


def test_space_caps_to_teacher_and_rejects_larger_students():
    minilm = TeacherShape(layers=6, hidden=384, ffn=1536)
    space = SearchSpace(SearchSpaceConfig(), minilm)
    assert space.layers == [3, 4, 6] and space.hidden == [384] and max(space.ffn) == 1536
    with pytest.raises(ArchError, match="hidden = 768 is not allowed.*capped to the teacher"):
        space.validate(StudentArch(4, 768, 12, 1536))
    uncapped = SearchSpace(SearchSpaceConfig(cap_to_teacher=False), minilm)
    assert uncapped.validate(StudentArch(4, 768, 12, 1536))


def test_capping_that_empties_a_dimension_is_an_error():
    with pytest.raises(ArchError, match="search_space.hidden"):
        SearchSpace(SearchSpaceConfig(hidden=[768]), TeacherShape(6, 384, 1536))


def test_heads_wider_than_the_teachers_are_left_out_when_students_are_cut_from_it():
    mpnet = TeacherShape(12, 768, 3072, head_dim=64)
    space = SearchSpace(SearchSpaceConfig(), mpnet, inherits=True)
    assert space.heads_for(384) == [6, 12] and space.heads_for(768) == [12]
    assert {a.hidden // a.heads for a in space} <= {32, 64}
    rng = random.Random(0)
    for _ in range(200):  # sampling and mutation (which re-draws heads when hidden moves) stay inside
        arch = space.mutate(space.sample(rng), rng)
        assert arch.hidden // arch.heads <= 64 and arch in space
    wide = StudentArch(3, 768, 2, 1024)  # a parent from a warm start's uncapped search
    assert all(space.mutate(wide, random.Random(i)) in space for i in range(50))
    with pytest.raises(ArchError, match=r"heads = 2 makes each head 384 wide, wider than the teacher's 64.*\[12\]"):
        space.validate(StudentArch(3, 768, 2, 1024))
    assert space.validate(StudentArch(3, 768, 12, 1024))
    assert SearchSpace(SearchSpaceConfig(), mpnet).heads_for(768) == [2, 3, 4, 6, 12]  # random init: not capped


def test_a_head_cap_that_leaves_no_heads_is_an_error_naming_the_field():
    with pytest.raises(ArchError, match="search_space.heads: every choice makes heads wider than the teacher's"):
        SearchSpace(SearchSpaceConfig(heads=[2, 3]), TeacherShape(12, 768, 3072, 64), inherits=True)


def test_students_cut_from_the_teacher_search_only_its_activation():
    mpnet = TeacherShape(12, 768, 3072, head_dim=64, activation="gelu")
    space = SearchSpace(SearchSpaceConfig(), mpnet, inherits=True)
    assert space.activation == ["gelu"] and {a.activation for a in space} == {"gelu"}
    with pytest.raises(ArchError, match=r"activation = silu is not allowed.*cap_activation\); allowed: \['gelu'\]"):
        space.validate(StudentArch(12, 384, 12, 384, "silu"))
    # A warm start's parent searched with silu mutates into the capped space.
    assert all(space.mutate(StudentArch(12, 384, 12, 384, "silu"), random.Random(i)) in space for i in range(50))
    assert SearchSpace(SearchSpaceConfig(), mpnet).activation == ["gelu", "relu", "silu"]  # random init
    uncapped = SearchSpace(SearchSpaceConfig(cap_activation=False), mpnet, inherits=True)
    assert uncapped.activation == ["gelu", "relu", "silu"]
    other = TeacherShape(12, 768, 3072, head_dim=64, activation=None)  # e.g. gelu_new: nothing to keep
    assert SearchSpace(SearchSpaceConfig(), other, inherits=True).activation == ["gelu", "relu", "silu"]
    with pytest.raises(ArchError, match=r"search_space.activation: \['relu'\] leaves out the teacher's gelu"):
        SearchSpace(SearchSpaceConfig(activation=["relu"]), mpnet, inherits=True)


def test_transformers_activation_names_map_to_the_same_function_or_to_none():
    from kdnas_core.search.space import activation_named

    assert [activation_named(n) for n in ("gelu", "relu", "silu", "swish")] == ["gelu", "relu", "silu", "silu"]
    assert activation_named("gelu_new") is None and activation_named(None) is None


def test_a_name_with_a_huge_number_is_one_short_line():
    """Python refuses int() of over 4,300 digits with its own ValueError."""
    with pytest.raises(ArchError, match=r"layers has 5000 digits") as err:
        StudentArch.from_name("L" + "9" * 5000 + "-H384-A6-F1536-gelu")
    assert len(str(err.value)) < 200
