"""resolv-conf: /run/captainos/resolv.conf from networkd's link states, the boot NIC's first."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.image.conftest import Sandbox

BOOT_MAC = "52:54:00:77:00:02"


def links(sandbox: Sandbox, nics: dict[str, tuple[int, str]], states: dict[int, str], cmdline: str) -> None:
    """Fake /sys/class/net (name -> ifindex, MAC) and networkd's link state files."""
    for name, (index, mac) in nics.items():
        dev = sandbox.root / "sys/class/net" / name
        dev.mkdir(parents=True)
        (dev / "ifindex").write_text(f"{index}\n")
        (dev / "address").write_text(f"{mac}\n")
    state_dir = sandbox.root / "run/systemd/netif/links"
    state_dir.mkdir(parents=True)
    for index, text in states.items():
        (state_dir / str(index)).write_text(f"# This is private data. Do not parse.\nADMIN_STATE=configured\n{text}")
    sandbox.cmdline(cmdline)


def resolv(sandbox: Sandbox) -> list[str]:
    result = sandbox.run("resolv-conf")
    assert result.returncode == 0, result.stderr
    text = (sandbox.root / "run/captainos/resolv.conf").read_text()
    return [line for line in text.splitlines() if not line.startswith("#")]


NICS = {"lo": (1, "00:00:00:00:00:00"), "ens3": (2, "52:54:00:99:00:01"), "ens4": (3, BOOT_MAC),
        "ens5": (10, "52:54:00:99:00:03")}


def test_the_boot_nics_servers_and_domains_come_first_whatever_its_index(sandbox):
    links(sandbox, NICS, {1: "DNS=\n", 2: "DNS=10.88.0.1\nDOMAINS=other.example\n",
                          3: "DNS=10.77.0.1 10.77.0.2\nDOMAINS=lab.example\n", 10: "DNS=10.99.0.1\n"},
          f"console=ttyS0 hw_addr={BOOT_MAC.upper().replace(':', '-')}")
    assert resolv(sandbox) == ["nameserver 10.77.0.1", "nameserver 10.77.0.2", "nameserver 10.88.0.1",
                               "search lab.example other.example"]


def test_without_hw_addr_links_go_in_interface_order_numerically(sandbox):
    links(sandbox, NICS, {10: "DNS=10.99.0.1\n", 2: "DNS=10.88.0.1\n", 3: "DNS=10.77.0.1\n"}, "console=ttyS0")
    assert resolv(sandbox) == ["nameserver 10.88.0.1", "nameserver 10.77.0.1", "nameserver 10.99.0.1"]


def test_a_vlan_on_the_boot_nic_counts_as_the_boot_nic(sandbox):
    """A VLAN keeps its parent's MAC; the parent carries no address of its own."""
    nics = {**NICS, "vlan42": (11, BOOT_MAC)}
    links(sandbox, nics, {2: "DNS=10.88.0.1\n", 3: "DNS=\n", 11: "DNS=10.42.0.1\n"},
          f"vlan_id=42 hw_addr={BOOT_MAC}")
    assert resolv(sandbox)[:2] == ["nameserver 10.42.0.1", "nameserver 10.88.0.1"]


def test_each_server_once_and_three_at_most(sandbox):
    links(sandbox, NICS, {2: "DNS=10.0.0.1 10.0.0.2\n", 3: "DNS=10.0.0.2 10.0.0.3 10.0.0.4\n"}, "")
    assert resolv(sandbox) == ["nameserver 10.0.0.1", "nameserver 10.0.0.2", "nameserver 10.0.0.3"]


def test_unchanged_servers_leave_the_file_alone(sandbox):
    links(sandbox, NICS, {2: "DNS=10.0.0.1\n"}, "")
    resolv(sandbox)
    out = sandbox.root / "run/captainos/resolv.conf"
    before = out.stat().st_ino
    result = sandbox.run("resolv-conf")
    assert (result.returncode, result.stderr) == (0, "")
    assert out.stat().st_ino == before
    (sandbox.root / "run/systemd/netif/links/3").write_text("DNS=10.0.0.9\n")
    assert resolv(sandbox) == ["nameserver 10.0.0.1", "nameserver 10.0.0.9"]
    assert out.stat().st_mode & 0o777 == 0o644


def test_no_links_yet_writes_a_file_without_servers(sandbox):
    sandbox.cmdline(f"hw_addr={BOOT_MAC}")
    assert resolv(sandbox) == []


def test_a_link_local_server_gets_its_interface_as_the_zone(sandbox):
    """Router advertisements often name the router's link-local address (RDNSS); networkd's
    state holds it without the interface it belongs to."""
    links(sandbox, NICS, {3: "DNS=10.77.0.1 fd77::1 fe80::77:ff:fe00:1\n", 2: "DNS=fe80::1%ens3\n"},
          f"hw_addr={BOOT_MAC}")
    assert resolv(sandbox) == ["nameserver 10.77.0.1", "nameserver fd77::1", "nameserver fe80::77:ff:fe00:1%ens4"]
