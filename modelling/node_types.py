"""Node types: the kinds of machine a pipeline's models were trained on (SPEC sections 5, 8).

``node_type_index.json`` maps each integer node type to its machine spec (``attrs``) and the
machines seen of that kind (``members``). A spec is matched to a node type by exact cover when
the spec is complete, else by weighted similarity, and every match says how uncertain it is.
Training assigns a node type from the data's spec, adding a new type when none covers it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from modelling.machine_spec import ATTRIBUTES, MachineSpec, MachineSpecError

logger = logging.getLogger(__name__)

INDEX_FILE = "node_type_index.json"
WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"processor": 5.0, "cores": 1.0, "chips": 1.0, "memory": 0.5, "frequency": 0.5}
)
TOTAL_WEIGHT = sum(WEIGHTS[a] for a in ATTRIBUTES)


class NodeTypeIndexError(ValueError):
    """An index that is not ``{"<int>": {"attrs": {...}, "members": [...]}}``, or a spec that
    cannot be placed in one."""


class AmbiguousNodeTypeError(NodeTypeIndexError):
    """An incomplete spec that several node types cover: training cannot tell which it is."""


@dataclass(frozen=True)
class NodeType:
    spec: MachineSpec
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeTypeMatch:
    """How well ``node_type`` fits a spec.

    ``similarity``: weighted agreement over the attributes the spec knows (1 = all equal).
    ``uncertainty``: the weight of everything not confirmed, over all five attributes: 0 for an
    exact cover of a complete spec, higher when attributes differ or are unknown on either side.
    ``runner_up``: the next best node type and its similarity, to show how close the call was.
    """

    node_type: int
    similarity: float
    uncertainty: float
    exact: bool
    runner_up: int | None = None
    runner_up_similarity: float | None = None


def covers(attrs: MachineSpec, spec: MachineSpec) -> bool:
    """Every attribute the spec knows equals the node type's (an empty spec is covered by none)."""
    known = spec.known()
    return bool(known) and all(getattr(attrs, name) == getattr(spec, name) for name in known)


def attribute_similarity(name: str, ours: str | float, theirs: str | float) -> float:
    """1 for equal names; 1 - |a-b| / mean(a, b) for numbers, floored at 0; 0 when unknown."""
    if not ours or not theirs:
        return 0.0
    if isinstance(ours, str) or isinstance(theirs, str):
        return 1.0 if ours == theirs else 0.0
    mean = (float(ours) + float(theirs)) / 2.0
    return max(0.0, 1.0 - abs(float(ours) - float(theirs)) / mean)


def _agreement(spec: MachineSpec, attrs: MachineSpec) -> float:
    """Sum of weight x similarity over the attributes the spec knows."""
    return sum(
        WEIGHTS[name] * attribute_similarity(name, getattr(spec, name), getattr(attrs, name))
        for name in spec.known()
    )


def similarity(spec: MachineSpec, attrs: MachineSpec) -> float:
    """Weighted similarity over the attributes the spec knows; 0 for an empty spec."""
    known_weight = sum(WEIGHTS[name] for name in spec.known())
    return _agreement(spec, attrs) / known_weight if known_weight else 0.0


def score(node_type: int, attrs: MachineSpec, spec: MachineSpec) -> NodeTypeMatch:
    """The match of one node type, without a runner-up."""
    exact = spec.complete and covers(attrs, spec)
    if exact:
        return NodeTypeMatch(node_type, 1.0, 0.0, True)
    uncertainty = 1.0 - _agreement(spec, attrs) / TOTAL_WEIGHT
    return NodeTypeMatch(node_type, similarity(spec, attrs), max(0.0, uncertainty), False)


def rank(matches: Iterable[NodeTypeMatch]) -> list[NodeTypeMatch]:
    """Exact covers first, then by similarity; the lower node type wins a tie."""
    return sorted(matches, key=lambda m: (not m.exact, -m.similarity, m.node_type))


def with_runner_up(best: NodeTypeMatch, others: Iterable[NodeTypeMatch]) -> NodeTypeMatch:
    """``best`` with the most similar of the other node types as its runner-up."""
    rest = rank(m for m in others if m.node_type != best.node_type)
    if not rest:
        return best
    return NodeTypeMatch(
        best.node_type,
        best.similarity,
        best.uncertainty,
        best.exact,
        rest[0].node_type,
        rest[0].similarity,
    )


@dataclass(frozen=True)
class NodeTypeIndex:
    """The node types of one pipeline, keyed by their integer index."""

    types: Mapping[int, NodeType] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any, strict: bool = True) -> NodeTypeIndex:
        """Parse ``node_type_index.json``; when not strict, bad entries are logged and left out."""
        if not isinstance(body, dict):
            raise NodeTypeIndexError("a node type index is a JSON object")
        types = {}
        for key, entry in body.items():
            try:
                types[_index_key(key)] = _node_type(key, entry)
            except (NodeTypeIndexError, MachineSpecError) as exc:
                if strict:
                    raise NodeTypeIndexError(f"node type {key!r}: {exc}") from None
                logger.warning("ignoring node type %r of the index: %s", key, exc)
        return cls(dict(sorted(types.items())))

    def to_json(self) -> dict[str, Any]:
        return {
            str(index): {"attrs": node.spec.to_dict(), "members": list(node.members)}
            for index, node in sorted(self.types.items())
        }

    def covering(self, spec: MachineSpec) -> list[int]:
        """Node types that cover ``spec``, lowest first."""
        return [index for index, node in self.types.items() if covers(node.spec, spec)]

    def score(self, node_type: int, spec: MachineSpec) -> NodeTypeMatch:
        """How well one node type fits; a type missing from the index knows nothing."""
        node = self.types.get(node_type)
        return score(node_type, node.spec if node else MachineSpec(), spec)

    def match(self, spec: MachineSpec, among: Iterable[int] | None = None) -> NodeTypeMatch | None:
        """The node type that fits ``spec`` best, among ``among`` (default: all); None when
        there is nothing to choose from or the spec knows no attribute."""
        candidates = sorted(set(self.types if among is None else among))
        if not candidates or not spec.known():
            return None
        ranked = rank(self.score(index, spec) for index in candidates)
        return with_runner_up(ranked[0], ranked[1:])

    def assign(self, spec: MachineSpec, members: Iterable[str] = ()) -> tuple[int, NodeTypeIndex]:
        """The node type training data of ``spec`` belongs to, and the index recording it.

        The node type that covers the spec is kept (its members extended); when none does, a
        new one is added with the next free index. Raises for an empty spec and for an
        incomplete one that several node types cover.
        """
        if not spec.known():
            raise NodeTypeIndexError("the machine spec knows none of " + ", ".join(ATTRIBUTES))
        covering = self.covering(spec)
        if len(covering) > 1 and not spec.complete:
            raise AmbiguousNodeTypeError(
                f"node types {covering} all cover the incomplete spec {spec.to_dict()}; "
                "give a complete spec or the node type"
            )
        if covering:
            return covering[0], self._with_members(covering[0], members)
        index = max(self.types, default=-1) + 1
        if not spec.complete:
            logger.warning("new node type %d from an incomplete spec %s", index, spec.to_dict())
        logger.info("new node type %d for %s", index, spec.to_dict())
        types = {**self.types, index: NodeType(spec, tuple(dict.fromkeys(members)))}
        return index, NodeTypeIndex(types)

    def _with_members(self, index: int, members: Iterable[str]) -> NodeTypeIndex:
        node = self.types[index]
        merged = tuple(dict.fromkeys((*node.members, *members)))
        return NodeTypeIndex({**self.types, index: NodeType(node.spec, merged)})


def _index_key(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise NodeTypeIndexError("node types are keyed by integers") from None


def _node_type(key: str, entry: Any) -> NodeType:
    if not isinstance(entry, dict) or not isinstance(entry.get("attrs"), dict):
        raise NodeTypeIndexError("an entry is {'attrs': {...}, 'members': [...]}")
    members = entry.get("members") or []
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise NodeTypeIndexError("members is a list of machine ids")
    return NodeType(MachineSpec.from_mapping(entry["attrs"]), tuple(members))


def load_index(path: Path) -> NodeTypeIndex:
    """The index in ``path`` (a file, or a pipeline folder holding one); empty when absent."""
    file = path / INDEX_FILE if path.is_dir() else path
    if not file.is_file():
        return NodeTypeIndex()
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise NodeTypeIndexError(f"cannot read {file}: {exc}") from exc
    return NodeTypeIndex.from_json(body)


def save_index(index: NodeTypeIndex, path: Path) -> Path:
    """Write the index to ``path`` (a file, or a folder that gets ``node_type_index.json``)."""
    file = path / INDEX_FILE if path.is_dir() else path
    file.write_text(json.dumps(index.to_json(), indent=1) + "\n")
    return file
