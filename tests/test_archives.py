"""Model archives are read without trusting them: no pickle, no escaping path, no surprise."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.neighbors import KNeighborsRegressor

from modelling.archive import UnsafeArchiveError
from modelling.components import (
    ComponentModel,
    ConstantComponent,
    LinearComponent,
    ModelFileError,
    SkopsComponent,
    load_component,
)
from modelling.power_model import SCALER_FILE, PowerModel


class Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.marker, "unpickled"))  # type: ignore[return-value]


class Untrusted:
    """A type no trusted list names."""

    def __init__(self) -> None:
        self.value = 1


def small_model() -> PowerModel:
    components: dict[str, ComponentModel] = {
        "package": LinearComponent(10.0, (2.0,)),
        "dram": ConstantComponent(3.0),
    }
    metadata = {"model_name": "SGDRegressorTrainer_0", "model_file": "SGDRegressorTrainer_0.json"}
    return PowerModel(
        "SGDRegressorTrainer_0", ("cpu_instructions",), np.array([4.0]), components, metadata
    )


def zipped(members: dict[str, bytes]) -> bytes:
    """A zip written member by member, names as given (write_archive would refuse them)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def members_of(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as handle:
        return {name: handle.read(name) for name in handle.namelist()}


def with_component_file(name: str, data: bytes) -> bytes:
    """Our small model's archive with its package component replaced by ``name``."""
    members = members_of(small_model().to_archive())
    component_map = json.loads(members["SGDRegressorTrainer_0.json"])
    component_map["package"]["model_file"] = name
    members["SGDRegressorTrainer_0.json"] = json.dumps(component_map).encode()
    del members["package.json"]
    members[name] = data
    return zipped(members)


def test_our_archive_round_trips() -> None:
    model = PowerModel.from_archive(small_model().to_archive())
    assert model.predict(np.array([[4.0]]))["package"][0] == pytest.approx(12.0)
    assert set(members_of(small_model().to_archive())) == {
        "metadata.json",
        "SGDRegressorTrainer_0.json",
        SCALER_FILE,
        "package.json",
        "dram.json",
    }


def test_an_archive_holding_a_pickle_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    archive = with_component_file("package.pkl", pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeArchiveError, match="'package.pkl' is a pickle; pickles are never"):
        PowerModel.from_archive(archive)
    assert not marker.exists()


def test_a_pickle_under_a_model_file_name_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for name in ("package.skops", "package.json", "package.xgb.json", "package.bin"):
        archive = with_component_file(name, pickle.dumps(Payload(marker)))
        with pytest.raises(ModelFileError):
            PowerModel.from_archive(archive)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x", "escapes the archive folder"),
        ("models/../../x", "escapes the archive folder"),
        ("/etc/x", "has an absolute path"),
        ("C:/x", "has an absolute path"),
    ],
)
def test_a_member_path_leaving_the_archive_folder_is_refused(name: str, message: str) -> None:
    members = members_of(small_model().to_archive())
    members[name] = b"{}"
    with pytest.raises(UnsafeArchiveError, match=message):
        PowerModel.from_archive(zipped(members))


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_a_truncated_archive_is_refused(keep: float) -> None:
    archive = small_model().to_archive()
    with pytest.raises(UnsafeArchiveError, match="not a readable zip archive"):
        PowerModel.from_archive(archive[: int(len(archive) * keep)])


def test_an_archive_without_its_metadata_is_refused() -> None:
    members = members_of(small_model().to_archive())
    del members["metadata.json"]
    with pytest.raises(ModelFileError, match="lacks or mangles a required file"):
        PowerModel.from_archive(zipped(members))


def test_a_skops_file_holding_an_untrusted_type_is_refused() -> None:
    with pytest.raises(ModelFileError, match="untrusted types"):
        load_component("package.skops", sio.dumps(Untrusted()))


def test_a_skops_file_of_a_trusted_estimator_loads() -> None:
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10.0)
    original = SkopsComponent(KNeighborsRegressor(n_neighbors=2).fit(x, y))
    loaded = load_component("package.skops", original.to_bytes())
    np.testing.assert_array_equal(loaded.predict(x + 0.3), original.predict(x + 0.3))


def test_a_tree_whose_child_points_back_is_refused() -> None:
    looping = {
        "kind": "tree_ensemble",
        "base": 0.0,
        "rate": 0.1,
        "trees": [
            {
                "left": [1, 0, -1],
                "right": [2, -1, -1],
                "feature": [0, 0, 0],
                "threshold": [0.5, 0.5, 0.0],
                "value": [0.0, 1.0, 2.0],
            }
        ],
    }
    with pytest.raises(ModelFileError, match="children must follow their parent"):
        load_component("package.json", json.dumps(looping).encode())


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"kind": "exec"}', b'{"kind": "linear", "coef": [1]}'],
)
def test_a_malformed_or_unknown_json_component_is_refused(body: bytes) -> None:
    with pytest.raises(ModelFileError):
        load_component("package.json", body)
