"""dhcp-hostname: the host name from networkd's DHCP lease, unless ipam= set one."""

from __future__ import annotations


def prepare(sandbox, leases: dict[str, str]) -> None:
    (sandbox.root / "proc/sys/kernel").mkdir(parents=True)
    (sandbox.root / "proc/sys/kernel/hostname").write_text("localhost\n")
    lease_dir = sandbox.root / "run/systemd/netif/leases"
    lease_dir.mkdir(parents=True)
    for index, text in leases.items():
        (lease_dir / index).write_text(text)
    sandbox.cmdline("console=ttyS0")


def hostname(sandbox) -> str:
    return (sandbox.root / "proc/sys/kernel/hostname").read_text().strip()


def test_takes_the_host_name_of_the_lowest_interface_with_one(sandbox):
    prepare(sandbox, {"3": "ADDRESS=10.0.0.3\nHOSTNAME=third\n", "10": "HOSTNAME=tenth\n", "2": "ADDRESS=10.0.0.2\n"})
    result = sandbox.run("dhcp-hostname")
    assert result.returncode == 0, result.stderr
    assert hostname(sandbox) == "third"
    assert result.logs()[0]["msg"] == "host name from DHCP" and result.logs()[0]["hostname"] == "third"


def test_no_lease_or_no_name_changes_nothing(sandbox):
    prepare(sandbox, {"2": "ADDRESS=10.0.0.2\n"})
    result = sandbox.run("dhcp-hostname")
    assert (result.returncode, result.stderr, hostname(sandbox)) == (0, "", "localhost")


def test_invalid_name_is_refused_with_a_warning(sandbox):
    prepare(sandbox, {"2": "HOSTNAME=bad_name;rm\n"})
    result = sandbox.run("dhcp-hostname")
    assert result.returncode == 0
    assert hostname(sandbox) == "localhost"
    assert result.messages("warning") == ["ignoring an invalid host name from DHCP"]


def test_ipam_host_name_wins(sandbox):
    prepare(sandbox, {"2": "HOSTNAME=fromdhcp\n"})
    (sandbox.root / "run/captainos").mkdir(parents=True)
    (sandbox.root / "run/captainos/hostname-from-ipam").write_text("")
    assert sandbox.run("dhcp-hostname").returncode == 0
    assert hostname(sandbox) == "localhost"


def test_network_setup_marks_an_ipam_host_name(sandbox):
    (sandbox.root / "proc/sys/kernel").mkdir(parents=True)
    (sandbox.root / "proc/sys/kernel/hostname").write_text("localhost\n")
    sandbox.cmdline("ipam=de-ad-be-ef-fe-ed::10.0.0.5:24::named:1.1.1.1::")
    assert sandbox.run("network-setup").returncode == 0
    assert (sandbox.root / "run/captainos/hostname-from-ipam").exists()
    assert hostname(sandbox) == "named"


def test_name_too_long_for_the_kernel_is_refused(sandbox):
    prepare(sandbox, {"2": f"HOSTNAME={'n' * 65}\n"})
    result = sandbox.run("dhcp-hostname")
    assert hostname(sandbox) == "localhost"
    assert result.messages("warning") == ["ignoring an invalid host name from DHCP"]


def test_the_boot_nics_lease_names_the_machine(sandbox):
    """hw_addr= (the NIC Smee booted) wins over a lower interface index: another network's DHCP
    server may hand out a name of its own."""
    prepare(sandbox, {"2": "HOSTNAME=other-network\n", "3": "HOSTNAME=captain-01\n"})
    for name, index, mac in (("ens3", 2, "52:54:00:99:00:01"), ("ens4", 3, "52:54:00:77:00:01")):
        dev = sandbox.root / "sys/class/net" / name
        dev.mkdir(parents=True)
        (dev / "ifindex").write_text(f"{index}\n")
        (dev / "address").write_text(f"{mac}\n")
    sandbox.cmdline("hw_addr=52:54:00:77:00:01")
    assert sandbox.run("dhcp-hostname").returncode == 0
    assert hostname(sandbox) == "captain-01"
    sandbox.cmdline("console=ttyS0")  # without hw_addr: the lowest index
    assert sandbox.run("dhcp-hostname").returncode == 0
    assert hostname(sandbox) == "other-network"
