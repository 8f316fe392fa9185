"""A trained power model: features, scaling, one component model per power component.

This is the unit that is published (as a zip plus, for weight-capable trainers, weight JSON),
served and evaluated by the estimator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelling.archive import read_archive, write_archive
from modelling.components import (
    ComponentModel,
    ConstantComponent,
    CurveComponent,
    LinearComponent,
    ModelFileError,
    load_component,
)
from modelling.vocabulary import WEIGHT_TRAINERS

SCALER_FILE = "scaler.json"


@dataclass
class PowerModel:
    """``features`` is the model's column order; ``scale`` the max-abs divisor of each."""

    name: str
    features: tuple[str, ...]
    scale: np.ndarray
    components: dict[str, ComponentModel]
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Watts per component for raw feature rows (columns in ``features`` order)."""
        x = np.asarray(rows, dtype=float) / self.scale
        powers = {}
        for component, model in self.components.items():
            watts = np.nan_to_num(model.predict(x), nan=0.0, posinf=0.0, neginf=0.0)
            powers[component] = np.clip(watts, 0.0, None)
        return powers

    def weights(self) -> dict[str, Any] | None:
        """Kepler's weight JSON, or None for a model Kepler does not get weights of.

        That is a model whose metadata names a trainer outside SPEC's weight-capable four
        (LinearRegressionTrainer is linear, but archive-only), or one with a component that
        is neither linear, a curve nor a constant.
        """
        trainer = self.metadata.get("trainer")
        if trainer is not None and trainer not in WEIGHT_TRAINERS:
            return None
        result: dict[str, Any] = {}
        linear = self._is_linear()
        for component, model in self.components.items():
            entry = self._linear_weights(model) if linear else self._curve_weights(model)
            if entry is None:
                return None
            result[component] = {"All_Weights": entry}
        return result

    def _is_linear(self) -> bool:
        return all(
            isinstance(m, LinearComponent | ConstantComponent) for m in self.components.values()
        ) and any(isinstance(m, LinearComponent) for m in self.components.values())

    def _linear_weights(self, model: ComponentModel) -> dict[str, Any] | None:
        if isinstance(model, ConstantComponent):
            model = LinearComponent(model.value, (0.0,) * len(self.features))
        if not isinstance(model, LinearComponent):
            return None
        numerical = {
            f: {"scale": float(s), "weight": float(w)}
            for f, s, w in zip(self.features, self.scale, model.coef, strict=True)
        }
        return {
            "Bias_Weight": float(model.intercept),
            "Categorical_Variables": {},
            "Numerical_Variables": numerical,
        }

    def _curve_weights(self, model: ComponentModel) -> dict[str, Any] | None:
        curve = self.metadata.get("curve")
        if isinstance(model, ConstantComponent) and curve:
            params = constant_curve_params(curve, model.value)
        elif isinstance(model, CurveComponent):
            params = list(model.params)
        else:
            return None
        numerical = {f: {"scale": float(s)} for f, s in zip(self.features, self.scale, strict=True)}
        return {
            "Categorical_Variables": {},
            "Numerical_Variables": numerical,
            "CurveFit_Weights": params,
        }

    def to_archive(self) -> bytes:
        """The model zip: metadata, component map, scaler and one file per component."""
        files: dict[str, bytes] = {}
        component_map = {}
        for component, model in self.components.items():
            model_file = component + model.file_suffix()
            files[model_file] = model.to_bytes()
            component_map[component] = {
                "model_file": model_file,
                "features": list(self.features),
                "fe_files": [SCALER_FILE],
            }
        scaler = {"kind": "maxabs", "features": list(self.features), "scale": self.scale.tolist()}
        files[SCALER_FILE] = json.dumps(scaler).encode()
        files[f"{self.name}.json"] = json.dumps(component_map, indent=1).encode()
        files["metadata.json"] = json.dumps(self.metadata, indent=1).encode()
        return write_archive(files)

    @classmethod
    def from_archive(cls, data: bytes) -> PowerModel:
        """Read one of our archives; old archives holding pickles are refused."""
        files = read_archive(data)
        try:
            metadata = json.loads(files["metadata.json"])
            name = metadata["model_name"]
            component_map = json.loads(files[metadata.get("model_file", f"{name}.json")])
            scaler = json.loads(files[SCALER_FILE])
            features = tuple(scaler["features"])
            scale = np.asarray(scaler["scale"], dtype=float)
            model_files = {c: entry["model_file"] for c, entry in component_map.items()}
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ModelFileError(f"archive lacks or mangles a required file: {exc!r}") from exc
        components = {}
        for component, model_file in model_files.items():
            if model_file not in files:
                raise ModelFileError(f"archive lacks {model_file!r}, the model of {component}")
            components[component] = load_component(model_file, files[model_file])
        return cls(name, features, scale, components, metadata)


def constant_curve_params(curve: str, value: float) -> list[float]:
    """Curve parameters that evaluate to ``value`` everywhere, for a constant component."""
    if curve == "logistic":
        return [0.0, 0.0, 1.0, value]
    if curve == "exponential":
        return [0.0, 0.0, value]
    return [0.0, 1.0, value]


def max_abs_scale(x: np.ndarray) -> np.ndarray:
    """Per-column maximum of |x|; a zero maximum becomes 1 so no column is divided by 0."""
    scale = np.max(np.abs(x), axis=0) if len(x) else np.ones(x.shape[1])
    return np.where(scale > 0, scale, 1.0).astype(float)
