"""The boot log: what each VM boot of a test run records, and the table made from it."""

import json
from pathlib import Path

import pytest

from captainos.core.config import Arch
from captainos.lab import boots, qemu


def test_nothing_is_written_without_a_log(tmp_path, monkeypatch):
    monkeypatch.delenv(boots.ENV, raising=False)
    boots.record(boots.Boot("t", "", "kernel", "2G", 1.0))
    assert list(tmp_path.iterdir()) == []


def test_a_guest_records_its_test_label_kind_and_seconds_once(tmp_path, monkeypatch):
    log_file = tmp_path / "boots.jsonl"
    monkeypatch.setenv(boots.ENV, str(log_file))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/lab/test_lab.py::test_bios (setup)")
    monkeypatch.setattr(qemu, "argv", lambda machine: ["sleep", "0.2"])
    machine = qemu.Machine(Arch.AMD64, net_boot=True, mem="384M")
    with qemu.Guest(machine, workdir=tmp_path / "vm-bios" / "qemu") as guest:
        assert guest.wait_exit(10) == 0
    lines = log_file.read_text().splitlines()
    assert len(lines) == 1, "wait_exit and the exit's kill record the boot once"
    entry = json.loads(lines[0])
    assert entry["test"] == "tests/lab/test_lab.py::test_bios"
    assert (entry["label"], entry["kind"], entry["mem"]) == ("vm-bios", "netboot", "384M")
    assert 0.1 < entry["seconds"] < 10


def test_a_killed_guest_is_recorded_too(tmp_path, monkeypatch):
    log_file = tmp_path / "boots.jsonl"
    monkeypatch.setenv(boots.ENV, str(log_file))
    monkeypatch.setattr(qemu, "argv", lambda machine: ["sleep", "30"])
    with qemu.Guest(qemu.Machine(Arch.AMD64, kernel=Path("/k"))):
        pass
    (boot,) = boots.load(log_file)
    assert (boot.kind, boot.label) == ("kernel", "") and boot.seconds < 10


def test_table_groups_by_test_in_boot_order_with_a_total(tmp_path):
    log_file = tmp_path / "boots.jsonl"
    for boot in (boots.Boot("tests/integration/test_image.py::test_selftest_passes", "", "kernel", "2G", 61.2),
                 boots.Boot("tests/lab/test_lab.py::test_bios_and_uefi[x]", "vm-bios", "netboot", "384M", 100.0),
                 boots.Boot("tests/lab/test_lab.py::test_bios_and_uefi[x]", "vm-uefi", "netboot", "384M", 90.4)):
        boots.record(boot, str(log_file))
    with log_file.open("a") as out:
        out.write('{"test": "cut sh')  # a run killed mid-line
    rows = boots.table(boots.load(log_file)).splitlines()
    assert rows[2] == "| `integration/test_image.py::test_selftest_passes` | 1 | 61 | kernel 2G | selftest passes |"
    assert rows[3] == ("| `lab/test_lab.py::test_bios_and_uefi[x]` | 2 | 190 | netboot 384M (vm-bios), "
                       "netboot 384M (vm-uefi) | bios and uefi |")
    assert rows[4] == "| total | 3 | 252 | | |"


@pytest.mark.parametrize("argv", [[], ["a", "b"], ["/nonexistent/boots.jsonl"]])
def test_main_refuses_bad_arguments_with_one_line(argv, capsys):
    assert boots.main(argv) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_lab_vm_that_powered_itself_off_is_recorded(tmp_path, monkeypatch):
    """The hub scenario's installed OS powers the machine off: the lab finds QEMU gone and
    must still log the boot (it was missing from CI's table)."""
    from captainos.core.config import Config
    from captainos.lab.lab import Lab

    log_file = tmp_path / "boots.jsonl"
    monkeypatch.setenv(boots.ENV, str(log_file))
    monkeypatch.setattr(qemu, "argv", lambda machine: ["true"])
    guest = qemu.Guest(qemu.Machine(Arch.AMD64, net_boot=True), workdir=tmp_path / "hub0" / "qemu")
    guest.start()
    assert guest.proc is not None
    guest.proc.wait(timeout=10)
    Lab(Config(cache_dir=tmp_path), name="t1", root=tmp_path / "lab")._power_off(guest)
    (boot,) = boots.load(log_file)
    assert boot.label == "hub0"
