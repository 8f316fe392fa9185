"""Machine specs read from saved /proc and sysfs files (SPEC section 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kepler_model.cli import app, read_machine_spec_option
from modelling.machine_spec import (
    MachineSpec,
    MachineSpecError,
    count_packages,
    discover_machine_spec,
    max_frequency_mhz,
    normalise_processor,
    parse_cpuinfo,
    parse_meminfo,
)

CPUINFO = Path(__file__).parent / "data" / "cpuinfo"
TWO_SOCKETS = CPUINFO / "two_socket_xeon_e5_2686v4.cpuinfo"
ONE_SOCKET_VM = CPUINFO / "one_socket_amd_epyc_vm.cpuinfo"
ARM = CPUINFO / "arm_neoverse_n1_no_model_name.cpuinfo"
# An i3.metal: 512 GiB installed, of which the kernel reports a little less.
I3_MEMINFO = "MemTotal:       527419904 kB\nMemFree:        520000000 kB\n"


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", "intel_xeon_e5_2686v4"),
        ("Intel(R) Xeon(R) Platinum 8252C CPU @ 3.80GHz", "intel_xeon_platinum_8252c"),
        ("Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz", "intel_core_i7_8650u"),
        ("AMD EPYC 7R13 Processor", "amd_epyc_7r13"),
        ("AMD Ryzen 9 5950X 16-Core Processor", "amd_ryzen_9_5950x"),
        ("intel_xeon_e5_2686v4", "intel_xeon_e5_2686v4"),
        ("", ""),
    ],
)
def test_processor_names_are_normalised(raw: str, normalised: str) -> None:
    assert normalise_processor(raw) == normalised


def test_two_socket_server_has_two_chips() -> None:
    info = parse_cpuinfo(TWO_SOCKETS.read_text())

    assert info.chips == 2
    assert info.cores == 72
    assert normalise_processor(info.processor) == "intel_xeon_e5_2686v4"


def test_one_socket_vm_has_one_chip() -> None:
    info = parse_cpuinfo(ONE_SOCKET_VM.read_text())

    assert (info.processor, info.cores, info.chips) == ("AMD EPYC", 2, 1)


def test_cpuinfo_without_physical_ids_leaves_chips_unknown() -> None:
    info = parse_cpuinfo(ARM.read_text())

    assert (info.processor, info.cores, info.chips) == ("", 4, 0)


def test_memory_is_memtotal_in_whole_gib() -> None:
    assert parse_meminfo(I3_MEMINFO) == 503
    assert parse_meminfo("MemFree: 1 kB\n") == 0


def test_frequency_is_the_highest_cpufreq_maximum_in_mhz() -> None:
    assert max_frequency_mhz(["2300000\n", "3000000\n", "garbage"]) == 3000
    assert max_frequency_mhz([]) == 0


def test_negative_package_ids_are_not_sockets() -> None:
    assert count_packages(["0\n", "1\n", "1\n", "-1\n", ""]) == 2


def fake_machine(root: Path, cpuinfo: Path, meminfo: str, khz: int | None) -> tuple[Path, Path]:
    """A /proc and /sys/devices/system/cpu tree holding the given files."""
    proc, sys_cpu = root / "proc", root / "sys"
    proc.mkdir()
    (proc / "cpuinfo").write_text(cpuinfo.read_text())
    (proc / "meminfo").write_text(meminfo)
    for cpu in range(parse_cpuinfo(cpuinfo.read_text()).cores):
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{cpu % 2}\n")
        if khz is not None:
            (sys_cpu / f"cpu{cpu}" / "cpufreq").mkdir()
            (sys_cpu / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").write_text(f"{khz}\n")
    return proc, sys_cpu


def test_discovery_reads_a_complete_spec(tmp_path: Path) -> None:
    proc, sys_cpu = fake_machine(tmp_path, TWO_SOCKETS, I3_MEMINFO, 3_000_000)

    spec = discover_machine_spec(proc, sys_cpu)

    assert spec.to_dict() == {
        "processor": "intel_xeon_e5_2686v4",
        "cores": 72,
        "chips": 2,
        "memory": 503,
        "frequency": 3000,
    }
    assert spec.complete


def test_discovery_takes_sockets_from_sysfs_when_cpuinfo_has_none(tmp_path: Path) -> None:
    proc, sys_cpu = fake_machine(tmp_path, ARM, "MemTotal: 8000000 kB\n", None)

    spec = discover_machine_spec(proc, sys_cpu)

    assert spec.chips == 2  # fake_machine gives alternate CPUs package ids 0 and 1
    assert spec.known() == ("cores", "chips", "memory")


def test_discovery_on_this_machine_knows_cores_and_memory() -> None:
    spec = discover_machine_spec()

    assert spec.cores >= 1 and spec.memory >= 0


def test_spec_from_mapping_treats_empty_and_zero_as_unknown() -> None:
    spec = MachineSpec.from_mapping({"processor": "", "cores": 0, "memory": None, "chips": 2})

    assert spec.known() == ("chips",)
    assert spec.to_dict() == {
        "processor": "",
        "cores": 0,
        "chips": 2,
        "memory": 0,
        "frequency": 0,
    }


@pytest.mark.parametrize("attrs", [{"cores": "48"}, {"cores": True}, {"memory": -1}])
def test_spec_from_mapping_rejects_wrong_types(attrs: dict[str, object]) -> None:
    with pytest.raises(MachineSpecError):
        MachineSpec.from_mapping(attrs)


def test_cli_spec_prints_this_machines_spec_as_json() -> None:
    result = CliRunner().invoke(app, ["spec"])

    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert set(body) == {"processor", "cores", "chips", "memory", "frequency"}
    assert body["cores"] >= 1


def test_train_machine_spec_file_is_read_and_normalised(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"processor": "Intel(R) Xeon(R) CPU E5-2686 v4", "cores": 72}))

    attrs = read_machine_spec_option(spec_file, tmp_path / "dump.json")

    assert attrs == {
        "processor": "intel_xeon_e5_2686v4",
        "cores": 72,
        "chips": 0,
        "memory": 0,
        "frequency": 0,
    }


def test_train_refuses_a_malformed_machine_spec_file(idle_dump: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text('{"cores": "many"}')

    result = CliRunner().invoke(
        app, ["train", "--input", str(idle_dump), "--machine-spec", str(spec_file)]
    )

    assert result.exit_code == 2
    assert "cores is a number" in result.output
