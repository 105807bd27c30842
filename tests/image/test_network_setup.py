"""network-setup: kernel command line -> systemd-networkd files in /run/systemd/network."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.image.conftest import Sandbox


IPAM = "ipam=de-ad-be-ef-fe-ed::192.168.2.193:255.255.255.0:192.168.2.1:myserver:1.1.1.1,8.8.8.8::132.163.97.1"


def setup(sandbox: Sandbox, cmdline: str) -> tuple[dict[str, str], Sandbox]:
    (sandbox.root / "proc/sys/kernel").mkdir(parents=True)
    (sandbox.root / "proc/sys/kernel/hostname").write_text("localhost\n")
    sandbox.cmdline(cmdline)
    result = sandbox.run("network-setup")
    assert result.returncode == 0, result.stderr
    sandbox.result = result  # type: ignore[attr-defined]
    netdir = sandbox.root / "run/systemd/network"
    return {p.name: p.read_text() for p in sorted(netdir.iterdir())}, sandbox


def hostname(sandbox: Sandbox) -> str:
    return (sandbox.root / "proc/sys/kernel/hostname").read_text().strip()


def test_no_parameters_leaves_the_shipped_dhcp_default(sandbox):
    files, _ = setup(sandbox, "console=ttyS0\n")
    assert files == {}


def test_ipam_gives_a_static_address_on_the_nic_with_that_mac(sandbox):
    files, sb = setup(sandbox, f"console=ttyS0 {IPAM}\n")
    unit = files["10-captainos-static.network"]
    assert "MACAddress=de:ad:be:ef:fe:ed" in unit
    assert "Type=ether" in unit and "Kind=!*" in unit
    assert "DHCP=no" in unit
    assert "Address=192.168.2.193/24" in unit
    assert "Gateway=192.168.2.1" in unit
    assert "DNS=1.1.1.1 8.8.8.8" in unit
    assert "NTP=132.163.97.1" in unit
    assert "Domains=" not in unit
    assert hostname(sb) == "myserver"
    assert sb.result.messages("info") == ["static network from ipam"]


def test_ipam_accepts_a_prefix_length_and_search_domains(sandbox):
    files, _ = setup(sandbox, "ipam=de-ad-be-ef-fe-ed::10.0.0.5:22:::1.1.1.1:a.example,b.example:")
    unit = files["10-captainos-static.network"]
    assert "Address=10.0.0.5/22" in unit
    assert "Domains=a.example b.example" in unit
    assert "Gateway=" not in unit


def test_ipam_with_a_vlan_puts_the_address_on_the_vlan(sandbox):
    files, _ = setup(sandbox, "ipam=de-ad-be-ef-fe-ed:100:192.168.2.193:24:192.168.2.1::1.1.1.1::")
    assert set(files) == {"10-captainos-static.network", "10-captainos-vlan100.netdev",
                          "10-captainos-vlan100-parent.network"}
    assert "Name=vlan100" in files["10-captainos-static.network"]
    assert "Kind=vlan" in files["10-captainos-vlan100.netdev"] and "Id=100" in files["10-captainos-vlan100.netdev"]
    parent = files["10-captainos-vlan100-parent.network"]
    assert "MACAddress=de:ad:be:ef:fe:ed" in parent and "VLAN=vlan100" in parent


@pytest.mark.parametrize(("vlan", "mask", "device", "prefix"), [("08", "08", "vlan8", "8"),
                                                                ("0100", "024", "vlan100", "24")])
def test_ipam_numbers_with_leading_zeros_are_base_10(sandbox, vlan, mask, device, prefix):
    files, sb = setup(sandbox, f"ipam=de-ad-be-ef-fe-ed:{vlan}:10.0.0.5:{mask}:::1.1.1.1::")
    assert sb.result.messages("error") == []
    assert f"Name={device}" in files["10-captainos-static.network"]
    assert f"Address=10.0.0.5/{prefix}" in files["10-captainos-static.network"]
    assert f"Id={device[4:]}\n" in files[f"10-captainos-{device}.netdev"]


def test_vlan_id_with_leading_zeros_is_base_10(sandbox):
    files, sb = setup(sandbox, "vlan_id=08 hw_addr=52:54:00:12:34:56\n")
    assert sb.result.messages("error") == []
    assert "Id=8\n" in files["10-captainos-vlan8.netdev"] and "Name=vlan8" in files["10-captainos-vlan8.network"]


def test_ipam_without_dns_warns_but_applies(sandbox):
    files, sb = setup(sandbox, "ipam=de-ad-be-ef-fe-ed::192.168.2.193:255.255.255.0:192.168.2.1:h:::")
    assert "Address=192.168.2.193/24" in files["10-captainos-static.network"]
    assert "DNS=" not in files["10-captainos-static.network"]
    warnings = sb.result.messages("warning")
    assert len(warnings) == 1 and "no DNS server" in warnings[0]


@pytest.mark.parametrize(("value", "why"), [
    ("garbage", "expected 9 colon-separated fields"),
    ("de-ad-be-ef-fe-ed::192.168.2.193:255.255.255.0:192.168.2.1:h:1.1.1.1::x:extra", "expected 9"),
    ("zz-ad-be-ef-fe-ed::192.168.2.193:24::::: ", "invalid MAC"),
    ("de-ad-be-ef-fe-ed:5000:192.168.2.193:24:::::", "VLAN id must be 1-4094"),
    ("de-ad-be-ef-fe-ed::192.168.2.300:24:::::", "invalid IPv4 address"),
    ("de-ad-be-ef-fe-ed::192.168.2.3:255.0.255.0:::::", "invalid netmask"),
    ("de-ad-be-ef-fe-ed::192.168.2.3:24:gw::::", "invalid gateway"),
    ("de-ad-be-ef-fe-ed::192.168.2.3:24::bad_host:::", "invalid hostname"),
    ("de-ad-be-ef-fe-ed::192.168.2.3:24:::1.1.1::", "invalid DNS"),
    # From "/", these globs match real directories; they must be refused as text.
    ("de-ad-be-ef-fe-ed::192.168.2.3:24::[b]in:::", "invalid hostname"),
    ("de-ad-be-ef-fe-ed::192.168.2.3:24:::1.1.1.1:[e]tc:", "invalid search domain"),
    ("de-ad-be-ef-fe-ed::192.168.2.3:24:::1.1.1.1::[p]roc", "invalid NTP"),
    # The kernel keeps 64 bytes of a host name and would cut the rest silently.
    (f"de-ad-be-ef-fe-ed::192.168.2.3:24::{'h' * 65}:::", "invalid hostname"),
])
def test_bad_ipam_is_one_error_line_and_dhcp_stays(sandbox, value, why):
    files, sb = setup(sandbox, f"console=ttyS0 ipam={value}\n")
    assert files == {}
    errors = sb.result.messages("error")
    assert len(errors) == 1 and why in errors[0]
    assert hostname(sb) == "localhost"


def test_vlan_id_with_hw_addr_runs_dhcp_on_the_vlan(sandbox):
    files, _ = setup(sandbox, "vlan_id=42 hw_addr=52:54:00:12:34:56\n")
    assert "DHCP=yes" in files["10-captainos-vlan42.network"]
    assert "Name=vlan42" in files["10-captainos-vlan42.network"]
    assert "MACAddress=52:54:00:12:34:56" in files["10-captainos-vlan42-parent.network"]
    assert "Id=42" in files["10-captainos-vlan42.netdev"]


@pytest.mark.parametrize("vlan", ["5000", "0", "x"])
def test_a_refused_vlan_id_is_one_error_and_the_boot_nic_still_comes_first(sandbox, vlan):
    files, sb = setup(sandbox, f"vlan_id={vlan} hw_addr=52:54:00:12:34:56")
    assert sorted(files) == ["10-captainos-boot.network", "90-captainos-dhcp.network"]
    assert sb.result.messages("error") == ["refusing a parameter: not a VLAN id (1-4094)"]


@pytest.mark.parametrize(("cmdline", "errors"), [
    ("vlan_id=12", ["ignoring vlan_id: it needs hw_addr=<mac> to find the NIC"]),
    ("vlan_id=12 hw_addr=nonsense", ["refusing a parameter: not a MAC address",
                                     "ignoring vlan_id: it needs hw_addr=<mac> to find the NIC"]),
])
def test_a_vlan_without_a_usable_hw_addr_is_ignored_with_why(sandbox, cmdline, errors):
    files, sb = setup(sandbox, cmdline)
    assert files == {}
    assert sb.result.messages("error") == errors


def test_a_valid_ipam_wins_over_vlan_id(sandbox):
    files, _ = setup(sandbox, f"{IPAM} vlan_id=42 hw_addr=de:ad:be:ef:fe:ed")
    assert not any("vlan42" in name for name in files)


def test_interface_restricts_dhcp_to_one_nic(sandbox):
    files, _ = setup(sandbox, "interface=eno2")
    unit = files["90-captainos-dhcp.network"]
    assert "Name=eno2" in unit and "DHCP=yes" in unit and "Type=ether" not in unit


def test_bad_interface_name_keeps_dhcp_everywhere(sandbox):
    files, sb = setup(sandbox, 'interface="eth0 eth1"')
    assert files == {}
    assert sb.result.messages("error") == ["refusing a parameter: not an interface name"]


def test_unknown_parameters_and_values_with_equals_are_ignored(sandbox):
    files, sb = setup(sandbox, f"foo=bar=baz unknown {IPAM}=\n")
    # the trailing "=" belongs to the NTP field, which then is not a valid server name
    assert files == {}
    assert sb.result.messages("error") == ["refusing a parameter: invalid NTP server list"]


def test_rerun_replaces_earlier_files(sandbox):
    setup(sandbox, "vlan_id=42 hw_addr=52:54:00:12:34:56")
    sandbox.cmdline("console=ttyS0")
    assert sandbox.run("network-setup").returncode == 0
    assert list((sandbox.root / "run/systemd/network").iterdir()) == []


@pytest.mark.parametrize("cmdline", [IPAM, "ipam=de-ad-be-ef-fe-ed:100:192.168.2.193:24:192.168.2.1::1.1.1.1::",
                                     "vlan_id=42 hw_addr=52:54:00:12:34:56", "interface=eno2",
                                     "hw_addr=52:54:00:12:34:56"])
def test_every_link_with_addresses_skips_ipv6_duplicate_address_detection(sandbox, cmdline):
    # networkd calls a link configured (wait-online, network-online.target) only once its IPv6
    # link-local address is usable; the probes would hold every boot back 1-2 s.
    files, _ = setup(sandbox, cmdline)
    with_addresses = {name: text for name, text in files.items()
                      if name.endswith(".network") and "LinkLocalAddressing=no" not in text}
    assert with_addresses
    for name, text in with_addresses.items():
        assert "\n[Network]\n" in text and "\nIPv6DuplicateAddressDetection=0\n" in text, name


def test_the_shipped_dhcp_default_skips_ipv6_duplicate_address_detection():
    from tests.image.test_tree import EXTRA

    text = (EXTRA / "usr/lib/systemd/network/90-captainos-dhcp.network").read_text()
    network = text.split("[Network]\n", 1)[1].split("\n[", 1)[0]
    assert "IPv6DuplicateAddressDetection=0" in network.splitlines()


def test_a_newline_inside_a_quoted_ipam_is_refused_and_interface_still_applies(sandbox):
    """network-setup never stops on one bad value: the parse refuses the word, DHCP stays, the
    later interface= is applied."""
    files, sb = setup(sandbox, 'ipam="de-ad-be-ef-fe-ed::10.0.0.5:24::::\nx" interface=eth1\n')
    assert "10-captainos-static.network" not in files
    unit = files["90-captainos-dhcp.network"]
    assert "Name=eth1" in unit and "DHCP=yes" in unit
    assert sb.result.messages("error") == [
        "refusing a parameter: its value holds a control character (a newline inside quotes?)"]


def test_hw_addr_alone_puts_the_boot_nic_first(sandbox):
    """Smee's hw_addr= (the NIC that netbooted): its DHCP routes get metric 100 (the others keep
    networkd's 1024) and it alone decides when the machine is online; every other ethernet NIC
    still runs DHCP and holds nothing back."""
    files, sb = setup(sandbox, "hw_addr=52-54-00-AA-BB-01\n")
    assert set(files) == {"10-captainos-boot.network", "90-captainos-dhcp.network"}
    boot = files["10-captainos-boot.network"]
    assert "MACAddress=52:54:00:aa:bb:01\nKind=!*\nType=ether\n" in boot
    assert "[Link]\nRequiredForOnline=yes\n" in boot and "DHCP=yes" in boot
    assert boot.count("RouteMetric=100\n") == 2 and "[IPv6AcceptRA]" in boot
    assert "ClientIdentifier=mac" in boot
    others = files["90-captainos-dhcp.network"]
    assert "Kind=!*\nType=ether\n" in others and "MACAddress" not in others
    assert "[Link]\nRequiredForOnline=no\n" in others and "DHCP=yes" in others and "RouteMetric" not in others
    assert sb.result.messages("info") == ["the boot NIC comes first"]


@pytest.mark.parametrize("cmdline", ["hw_addr=52:54:00:aa:bb:01 interface=eno2",
                                     f"hw_addr=de:ad:be:ef:fe:ed {IPAM}",
                                     "hw_addr=52:54:00:aa:bb:01 vlan_id=42"])
def test_a_nic_named_otherwise_keeps_hw_addr_out_of_it(sandbox, cmdline):
    """interface=, ipam= and vlan_id= name the NIC themselves: hw_addr= adds no file of its own
    (a MAC match would win over the VLAN's parent file, and interface= means only that NIC)."""
    files, _ = setup(sandbox, cmdline)
    assert "10-captainos-boot.network" not in files
    assert all("RouteMetric" not in text for text in files.values())


def test_an_invalid_hw_addr_is_one_error_and_every_nic_stays_alike(sandbox):
    files, sb = setup(sandbox, "hw_addr=52:54:00:aa:bb\n")
    assert files == {}
    assert sb.result.messages("error") == ["refusing a parameter: not a MAC address"]
