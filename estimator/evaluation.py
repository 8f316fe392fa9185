"""Models as the estimator evaluates them: all boosted trees of a model walked in one pass.

A gradient-boosted model holds a hundred small trees per component. Walking each component's
trees separately, with child indices looked up at every step, made prediction the largest
cost of a request. Here the trees of every component are laid out once, at load time, as
complete binary trees of one depth: slot ``s`` has children ``2s + 1`` and ``2s + 2``, so a
walk is ``depth`` steps of arithmetic over a (rows x trees) array, whatever the component.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from modelling.components import (
    ConstantComponent,
    CurveComponent,
    LinearComponent,
    PolynomialComponent,
    TreeEnsembleComponent,
)
from modelling.power_model import PowerModel

# A complete tree of this depth has 2**depth leaves; deeper ensembles keep their own walk.
MAX_DEPTH = 10
# Rows are walked in blocks whose (rows x trees) index arrays stay below this size: small
# enough for the CPU cache (500 rows in one block took twice as long), and below glibc's
# 128 KiB mmap threshold, above which every request faulted in fresh pages for its
# temporaries (a 500-row request of 200 trees: 2.2 ms in the server instead of 1.0 ms).
BLOCK_BYTES = 96 * 1024
# Components that a few numpy operations evaluate, as are trees walked by a Forest: a model
# of these alone takes a few milliseconds at most for a thousand rows.
QUICK_PARTS = (ConstantComponent, LinearComponent, PolynomialComponent, CurveComponent)


@dataclass(frozen=True, eq=False)
class Forest:
    """The trees of several components, as complete binary trees of depth ``depth``.

    ``feature`` and ``threshold`` hold ``2**depth - 1`` split slots per tree, ``leaf``
    ``2**depth`` values per tree, all flattened tree after tree. A leaf that sits above the
    common depth is copied into both children of a split that every finite value passes to
    the left, so each walk ends at a copy of it. Components' trees follow one another;
    ``starts`` says where each component's trees begin.
    """

    components: tuple[str, ...]
    starts: np.ndarray
    base: np.ndarray
    rate: np.ndarray
    depth: int
    feature: np.ndarray
    threshold: np.ndarray
    leaf: np.ndarray

    @classmethod
    def of(cls, ensembles: Mapping[str, TreeEnsembleComponent]) -> Forest | None:
        """The components' trees laid out together; None when a tree is deeper than MAX_DEPTH."""
        depth = max(_depth(ensemble) for ensemble in ensembles.values())
        if depth > MAX_DEPTH:
            return None
        grown = [_grown(ensemble, depth) for ensemble in ensembles.values()]
        counts = [ensemble.left.shape[0] for ensemble in ensembles.values()]
        return cls(
            components=tuple(ensembles),
            starts=np.cumsum([0, *counts[:-1]]),
            base=np.array([ensemble.base for ensemble in ensembles.values()]),
            rate=np.array([ensemble.rate for ensemble in ensembles.values()]),
            depth=depth,
            feature=np.concatenate([feature for feature, _, _ in grown]).ravel(),
            threshold=np.concatenate([threshold for _, threshold, _ in grown]).ravel(),
            leaf=np.concatenate([leaf for _, _, leaf in grown]).ravel(),
        )

    @property
    def trees(self) -> int:
        return self.leaf.size >> self.depth

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Watts per component for scaled rows, as each TreeEnsembleComponent computes them."""
        # What scikit-learn's trees compare. A value beyond float32's range becomes infinite, as
        # in scikit-learn's own cast, and so falls on the high side of every split.
        with np.errstate(over="ignore"):
            rows = np.asarray(x, dtype=np.float32).astype(float)
        sums = np.empty((rows.shape[0], len(self.components)))
        block = max(1, BLOCK_BYTES // (np.dtype(np.intp).itemsize * self.trees))
        for start in range(0, rows.shape[0], block):
            sums[start : start + block] = self._leaf_sums(rows[start : start + block])
        watts = self.base + self.rate * sums
        return {component: watts[:, index] for index, component in enumerate(self.components)}

    def _leaf_sums(self, rows: np.ndarray) -> np.ndarray:
        """Per component, the sum over its trees of each row's leaf value."""
        count, width = rows.shape
        trees = np.arange(self.trees)
        splits = (1 << self.depth) - 1
        first_split = trees * splits
        row_start = np.arange(count)[:, np.newaxis] * width
        values = rows.ravel()
        # ``split`` is a flat index into feature and threshold: tree t, slot s is t * splits + s.
        split = np.broadcast_to(first_split, (count, trees.size)).copy()
        for _ in range(self.depth):
            value = values.take(row_start + self.feature.take(split))
            goes_left = value <= self.threshold.take(split)
            split *= 2  # slot 2s + 1 to the left, 2s + 2 to the right
            split += 2 - first_split
            split -= goes_left
        leaves = self.leaf.take(split + (trees - splits))
        return np.add.reduceat(leaves, self.starts, axis=1)


def _depth(ensemble: TreeEnsembleComponent) -> int:
    """Split levels of the deepest tree; MAX_DEPTH + 1 for any deeper than MAX_DEPTH."""
    node = np.zeros((ensemble.left.shape[0], 1), dtype=np.intp)
    for level in range(MAX_DEPTH + 1):
        split = _at(ensemble.left, node) >= 0
        if not split.any():
            return level
        node = _children(ensemble, node, split)
    return MAX_DEPTH + 1


def _grown(
    ensemble: TreeEnsembleComponent, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split features and thresholds (trees x 2**depth - 1) and leaves (trees x 2**depth).

    Built level by level: ``node`` holds, for each tree, the original node in each slot.
    """
    trees = ensemble.left.shape[0]
    node = np.zeros((trees, 1), dtype=np.intp)
    features, thresholds = [np.zeros((trees, 0), np.intp)], [np.zeros((trees, 0))]
    for _ in range(depth):
        split = _at(ensemble.left, node) >= 0
        features.append(np.where(split, _at(ensemble.feature, node), 0))
        thresholds.append(np.where(split, _at(ensemble.threshold, node), np.inf))
        node = _children(ensemble, node, split)
    leaf = _at(ensemble.value, node)
    return np.concatenate(features, axis=1), np.concatenate(thresholds, axis=1), leaf


def _at(array: np.ndarray, node: np.ndarray) -> np.ndarray:
    """``array[tree, node]`` for every tree (row of ``node``) and slot."""
    return array[np.arange(node.shape[0])[:, np.newaxis], node]


def _children(ensemble: TreeEnsembleComponent, node: np.ndarray, split: np.ndarray) -> np.ndarray:
    """The next level's slots: a split's two children, or a leaf twice."""
    left = np.where(split, _at(ensemble.left, node), node)
    right = np.where(split, _at(ensemble.right, node), node)
    return np.stack([left, right], axis=2).reshape(node.shape[0], -1)


@dataclass(eq=False)
class ServingModel(PowerModel):
    """A PowerModel as the estimator evaluates it: tree ensembles together, by a Forest.

    Predictions are those of PowerModel.predict: non-finite and negative watts become 0.
    """

    forest: Forest | None = None

    @classmethod
    def of(cls, model: PowerModel) -> ServingModel:
        ensembles = {
            component: part
            for component, part in model.components.items()
            if isinstance(part, TreeEnsembleComponent)
        }
        forest = Forest.of(ensembles) if ensembles else None
        parts = (model.name, model.features, model.scale, model.components, model.metadata)
        return cls(*parts, forest)

    def predict(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(rows, dtype=float) / self.scale
        walked = self.forest.predict(x) if self.forest is not None else {}
        powers = {}
        for component, part in self.components.items():
            watts = walked[component] if component in walked else part.predict(x)
            # One pass instead of nan_to_num and clip, which took a tenth of a linear request.
            powers[component] = np.where(np.isfinite(watts) & (watts > 0.0), watts, 0.0)
        return powers


def is_quick(model: PowerModel) -> bool:
    """Whether every component of ``model`` is one of QUICK_PARTS or walked by its Forest."""
    forest = model.forest if isinstance(model, ServingModel) else None
    walked = forest.components if forest is not None else ()
    parts = model.components.items()
    return all(isinstance(part, QUICK_PARTS) or name in walked for name, part in parts)
