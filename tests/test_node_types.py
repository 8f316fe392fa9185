"""Node type indexes: cover, similarity with uncertainty, and assignment (SPEC sections 5, 8).

The index is the real one of Kepler's ec2-0.7.11 pipeline: six AWS metal instance types.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelling.machine_spec import MachineSpec
from modelling.node_types import (
    AmbiguousNodeTypeError,
    NodeTypeIndex,
    NodeTypeIndexError,
    attribute_similarity,
    covers,
    load_index,
    save_index,
    similarity,
)

EC2 = Path(__file__).parent / "data" / "model-db" / "ec2-0.7.11"
M5ZN = {
    "processor": "intel_xeon_platinum_8252c",
    "cores": 48,
    "chips": 2,
    "memory": 188,
    "frequency": 4500,
}
# Two-socket Sapphire Rapids (m7i.metal-48xl): no ec2-0.7.11 type covers it.
M7I_48XL = {
    "processor": "Intel(R) Xeon(R) Platinum 8488C",
    "cores": 192,
    "chips": 2,
    "memory": 755,
    "frequency": 3800,
}


@pytest.fixture(scope="module")
def ec2() -> NodeTypeIndex:
    return load_index(EC2)


def spec(**attrs: object) -> MachineSpec:
    return MachineSpec.from_mapping(attrs)


def test_published_index_round_trips_unchanged(ec2: NodeTypeIndex) -> None:
    assert ec2.to_json() == json.loads((EC2 / "node_type_index.json").read_text())


def test_complete_covered_spec_is_that_type_with_no_uncertainty(ec2: NodeTypeIndex) -> None:
    match = ec2.match(spec(**M5ZN))

    assert match is not None
    assert (match.node_type, match.exact, match.similarity, match.uncertainty) == (4, True, 1, 0)
    assert match.runner_up == 2
    assert match.runner_up_similarity == pytest.approx(0.2827, abs=1e-4)


def test_uncovered_spec_gets_the_most_similar_type_and_its_uncertainty(
    ec2: NodeTypeIndex,
) -> None:
    match = ec2.match(spec(**M7I_48XL))

    assert match is not None
    assert (match.node_type, match.exact) == (5, False)
    # processor 5 x 1, cores 1 x 1/3, chips 1 x 1/3, memory 0.5 x 0.332, frequency 0.5 x 1
    assert match.similarity == pytest.approx(0.7916, abs=1e-4)
    assert match.uncertainty == pytest.approx(0.2084, abs=1e-4)
    assert match.runner_up == 3
    assert match.runner_up_similarity == pytest.approx(0.2865, abs=1e-4)


def test_partial_spec_is_uncertain_even_when_covered(ec2: NodeTypeIndex) -> None:
    match = ec2.match(spec(cores=96, chips=2))

    assert match is not None
    assert (match.node_type, match.exact, match.similarity) == (0, False, 1.0)
    # Only cores and chips (2 of the 8 weight units) are confirmed.
    assert match.uncertainty == pytest.approx(0.75)
    assert match.runner_up_similarity == 1.0  # types 2 and 3 fit as well: a tie


def test_matching_can_be_limited_to_some_types(ec2: NodeTypeIndex) -> None:
    match = ec2.match(spec(**M5ZN), among=[0, 1])

    assert match is not None
    assert (match.node_type, match.runner_up, match.exact) == (1, 0, False)


def test_nothing_to_match_gives_none(ec2: NodeTypeIndex) -> None:
    assert ec2.match(MachineSpec()) is None
    assert NodeTypeIndex().match(spec(**M5ZN)) is None


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [(48, 48, 1.0), (48, 96, 1 / 3), (1, 10, 0.0), (0, 10, 0.0)],
)
def test_numeric_similarity_is_one_minus_relative_difference_floored(
    ours: float, theirs: float, expected: float
) -> None:
    assert attribute_similarity("cores", ours, theirs) == pytest.approx(expected)


def test_processor_similarity_is_all_or_nothing() -> None:
    assert attribute_similarity("processor", "intel_xeon", "intel_xeon") == 1.0
    assert attribute_similarity("processor", "intel_xeon_a", "intel_xeon_b") == 0.0


def test_attribute_unknown_to_the_type_counts_as_different() -> None:
    full = spec(processor="p", cores=8, chips=1, memory=32, frequency=3000)
    without_memory = spec(processor="p", cores=8, chips=1, frequency=3000)

    assert similarity(full, without_memory) == pytest.approx(7.5 / 8)


def test_cover_needs_every_known_attribute_equal() -> None:
    attrs = spec(**M5ZN)

    assert covers(attrs, spec(processor="Intel(R) Xeon(R) Platinum 8252C CPU @ 3.80GHz"))
    assert not covers(attrs, spec(processor="intel_xeon_platinum_8252c", memory=192))
    assert not covers(attrs, MachineSpec())


def test_assign_keeps_the_covering_type_and_records_the_member(ec2: NodeTypeIndex) -> None:
    node_type, index = ec2.assign(spec(**M5ZN), members=["node-a", "node-a"])

    assert node_type == 4
    assert index.types[4].members == ("m5zn.metal-ami-0e4d0bb9670ea8db0", "node-a")
    assert ec2.types[4].members == ("m5zn.metal-ami-0e4d0bb9670ea8db0",)


def test_assign_adds_a_new_type_when_none_covers(ec2: NodeTypeIndex) -> None:
    node_type, index = ec2.assign(spec(**M7I_48XL), members=["node-b"])

    assert node_type == 6
    assert index.to_json()["6"] == {
        "attrs": {**M7I_48XL, "processor": "intel_xeon_platinum_8488c"},
        "members": ["node-b"],
    }


def test_assign_into_an_empty_index_starts_at_zero() -> None:
    node_type, index = NodeTypeIndex().assign(spec(**M5ZN))

    assert node_type == 0
    assert list(index.types) == [0]


def test_assign_refuses_an_incomplete_spec_that_several_types_cover(ec2: NodeTypeIndex) -> None:
    with pytest.raises(AmbiguousNodeTypeError, match=r"\[0, 2, 3\]"):
        ec2.assign(spec(cores=96, chips=2))


def test_assign_refuses_an_empty_spec(ec2: NodeTypeIndex) -> None:
    with pytest.raises(NodeTypeIndexError, match="knows none"):
        ec2.assign(MachineSpec())


def test_malformed_entries_fail_strictly_and_are_skipped_leniently() -> None:
    body = {"0": {"attrs": M5ZN, "members": []}, "x": {"attrs": {}}, "1": {"attrs": "no"}}

    with pytest.raises(NodeTypeIndexError, match="'x'"):
        NodeTypeIndex.from_json(body)
    assert list(NodeTypeIndex.from_json(body, strict=False).types) == [0]


def test_saved_index_loads_back(ec2: NodeTypeIndex, tmp_path: Path) -> None:
    _, grown = ec2.assign(spec(**M7I_48XL))

    save_index(grown, tmp_path)

    assert load_index(tmp_path) == grown
    assert load_index(tmp_path / "absent") == NodeTypeIndex()
