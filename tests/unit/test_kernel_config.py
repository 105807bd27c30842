"""stages/kernel_config.py: the config fragments on disk, the resolved-config checker, the
required options and the module set kept from Debian's prebuilt kernel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.stages import kernel_config

# --- configs on disk ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(Arch))
def test_fragments_of_every_series_are_well_formed(arch: Arch) -> None:
    for kseries in kernel_config.available_series(arch):
        paths = kernel_config.config_fragments(kseries, arch)
        assert paths[-1].name == f"{arch.value}.config"
        seen: dict[str, str] = {}
        for path in paths:
            lines = path.read_text().splitlines()
            assert lines[0].startswith("# "), f"{path} starts without a comment"
            for line in lines:
                assert (not line or line.startswith("#") or re.match(r"^CONFIG_\w+=(y|m|\"[^\"]*\"|[0-9]+)$", line)), \
                    f"{path}: {line!r}"
                if m := re.match(r"^(CONFIG_\w+)=", line):
                    assert m[1] not in seen, f"{m[1]} set twice ({seen.get(m[1])} and {path.name})"
                    seen[m[1]] = path.name
            # Every section starts with a '# ---' heading before its first option.
            text = path.read_text()
            first_option = re.search(r"^CONFIG_", text, re.MULTILINE)
            assert first_option and "# ---" in text[:first_option.start()], f"{path}: options before a section"


def test_6_12_exists_for_both_arches() -> None:
    assert "6.12" in kernel_config.available_series(Arch.AMD64)
    assert "6.12" in kernel_config.available_series(Arch.ARM64)


@pytest.mark.parametrize("arch", [Arch.ARM64])
def test_arm64_sets_the_clock_from_the_rtc_at_boot(arch: Arch) -> None:
    # arm64 has no early clock but the RTC: without it TLS to the registry fails (the clock
    # starts at systemd's epoch) until NTP answers. Seen under qemu-system-aarch64, 2026-12-02.
    for kseries in kernel_config.available_series(arch):
        text = "\n".join(p.read_text() for p in kernel_config.config_fragments(kseries, arch))
        assert "\nCONFIG_RTC_HCTOSYS=y\n" in text + "\n", kseries


def test_missing_series_lists_what_exists() -> None:
    with pytest.raises(CaptainError, match=r"no config for 6\.13 on arm64; available: 6\.12"):
        kernel_config.config_fragments("6.13", Arch.ARM64)


def test_fragments_without_common(tmp_path: Path) -> None:
    (tmp_path / "7.1").mkdir()
    (tmp_path / "7.1" / "amd64.config").write_text("# x\n")
    assert kernel_config.config_fragments("7.1", Arch.AMD64, root=tmp_path) == [tmp_path / "7.1" / "amd64.config"]


def test_required_list_parses_without_duplicates() -> None:
    reqs = kernel_config.read_required()
    options = [r.option for r in reqs]
    assert len(options) == len(set(options))
    assert "CONFIG_OVERLAY_FS" in options and "CONFIG_RD_ZSTD" in options


def test_required_list_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "required.txt"
    bad.write_text("CONFIG_OK\nOVERLAY_FS overlay\n")
    with pytest.raises(CaptainError, match=r"required.txt:2: expected"):
        kernel_config.read_required(bad)


@pytest.mark.parametrize("arch", list(Arch))
def test_debian_module_list_per_arch(arch: Arch) -> None:
    names = kernel_config.read_module_list(arch)
    assert "overlay" in names and "br_netfilter" in names
    assert ("vmd" in names) == (arch is Arch.AMD64)


def test_module_list_rejects_unknown_arch(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("riscv64: foo\n")
    with pytest.raises(CaptainError, match="unknown architecture 'riscv64:'"):
        kernel_config.read_module_list(Arch.AMD64, tmp_path / "m.txt")


# --- config checker ----------------------------------------------------------------------

RESOLVED = """\
CONFIG_A=y
CONFIG_B=m
# CONFIG_C is not set
CONFIG_S="-captainos"
"""


def test_parse_config() -> None:
    assert kernel_config.parse_config(RESOLVED) == {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": "n",
                                                    "CONFIG_S": '"-captainos"'}


def test_fragment_mismatches() -> None:
    resolved = kernel_config.parse_config(RESOLVED)
    fragment = "CONFIG_A=y\nCONFIG_S=\"-captainos\"\n# CONFIG_C is not set\n"
    assert kernel_config.fragment_mismatches(fragment, resolved) == []
    assert kernel_config.fragment_mismatches("CONFIG_A=m\n", resolved) == []  # selected as built in: fine
    assert kernel_config.fragment_mismatches("CONFIG_B=y\nCONFIG_D=y\n# CONFIG_A is not set\n", resolved) == [
        "CONFIG_B=y (got m)", "CONFIG_D=y (got n)", "CONFIG_A=n (got y)"]


def test_missing_options() -> None:
    resolved = kernel_config.parse_config(RESOLVED)
    reqs = [kernel_config.Requirement("CONFIG_A", None), kernel_config.Requirement("CONFIG_B", "b-mod"),
            kernel_config.Requirement("CONFIG_C", "c")]
    assert kernel_config.missing_options(reqs, resolved) == [
        "CONFIG_B (=m but module b-mod is not kept)", "CONFIG_C (not set)"]
    assert kernel_config.missing_options(reqs, resolved, {"b_mod"}) == ["CONFIG_C (not set)"]


def test_check_required_names_every_missing_option(tmp_path: Path) -> None:
    (tmp_path / "required.txt").write_text("# comment\nCONFIG_A\nCONFIG_C\nCONFIG_E\n")
    (tmp_path / "config").write_text(RESOLVED)
    with pytest.raises(CaptainError, match=r"lacks options CaptainOS needs: CONFIG_C \(not set\), CONFIG_E"):
        kernel_config.check_required(tmp_path / "config", required=tmp_path / "required.txt")
    (tmp_path / "required.txt").write_text("CONFIG_A\n")
    kernel_config.check_required(tmp_path / "config", required=tmp_path / "required.txt")


# --- Debian module closure ---------------------------------------------------------------

MODULES_DEP = """\
kernel/fs/overlayfs/overlay.ko.xz:
kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/llc/llc.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/sound/snd.ko.xz:
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz:
"""
SOFTDEP = "# comment\nsoftdep ext4 pre: crc32c_generic nonexistent_mod\n"


def test_module_closure_follows_hard_and_soft_dependencies() -> None:
    keep = kernel_config.module_closure(["br-netfilter", "ext4", "virtio_pci"], MODULES_DEP, SOFTDEP,
                                        ["kernel/drivers/virtio/virtio_pci.ko"])
    assert keep == sorted([
        "kernel/net/bridge/br_netfilter.ko.xz", "kernel/net/bridge/bridge.ko.xz", "kernel/net/802/stp.ko.xz",
        "kernel/net/llc/llc.ko.xz", "kernel/fs/ext4/ext4.ko.xz", "kernel/fs/jbd2/jbd2.ko.xz",
        "kernel/fs/mbcache.ko.xz", "kernel/crypto/crc32c_generic.ko.xz"])


def test_module_closure_rejects_unknown_names() -> None:
    with pytest.raises(CaptainError, match="modules neither built nor built in: nosuchmod"):
        kernel_config.module_closure(["overlay", "nosuchmod"], MODULES_DEP)


def test_module_name_normalises() -> None:
    assert kernel_config.module_name("kernel/net/bridge/br_netfilter.ko.xz") == "br_netfilter"
    assert kernel_config.module_name("nls_iso8859-1.ko.zst") == "nls_iso8859_1"
    assert kernel_config.module_name("xt_MASQUERADE") == "xt_MASQUERADE"


# --- debian-modules.txt against the fragments ----------------------------------------------
# kernel/debian-modules.txt and kernel/configs/ describe one kernel twice: the modules kept from
# Debian's prebuilt image (debian-image) and the options of the kernel we compile. They agree
# when, for each architecture,
#   (1) every module the list keeps is one our fragments build (=y or =m), and
#   (2) every module our fragments build that Debian's kernel has as a module is kept: the
#       module of each =m option (by name, or as a dependency of a kept module), and the module
#       of each =y option that has a row in BUILT_BY.
# Which option builds which module is Kbuild's knowledge (`obj-$(CONFIG_X) += <module>.o`) and
# in neither file: BUILT_BY holds it for every module the list names. Its limit: a new =y
# driver that Debian builds as a module is held to the list only once it has a row here.

BUILT_BY = {  # module -> the option of our fragments that builds it
    # Virtio, zram
    "virtio_net": "CONFIG_VIRTIO_NET", "virtio_blk": "CONFIG_VIRTIO_BLK", "virtio_scsi": "CONFIG_SCSI_VIRTIO",
    "virtio_rng": "CONFIG_HW_RANDOM_VIRTIO", "virtio_balloon": "CONFIG_VIRTIO_BALLOON", "zram": "CONFIG_ZRAM",
    # Storage
    "nvme": "CONFIG_BLK_DEV_NVME", "ahci": "CONFIG_SATA_AHCI", "megaraid_sas": "CONFIG_MEGARAID_SAS",
    "mpt3sas": "CONFIG_SCSI_MPT3SAS", "mpi3mr": "CONFIG_SCSI_MPI3MR", "smartpqi": "CONFIG_SCSI_SMARTPQI",
    "hpsa": "CONFIG_SCSI_HPSA", "aacraid": "CONFIG_SCSI_AACRAID", "sd_mod": "CONFIG_BLK_DEV_SD",
    "sr_mod": "CONFIG_BLK_DEV_SR", "sg": "CONFIG_CHR_DEV_SG", "usb_storage": "CONFIG_USB_STORAGE",
    "uas": "CONFIG_USB_UAS", "loop": "CONFIG_BLK_DEV_LOOP", "raid0": "CONFIG_MD_RAID0", "raid1": "CONFIG_MD_RAID1",
    "raid10": "CONFIG_MD_RAID10", "raid456": "CONFIG_MD_RAID456", "dm_mod": "CONFIG_BLK_DEV_DM",
    "ata_piix": "CONFIG_ATA_PIIX", "vmd": "CONFIG_VMD", "sym53c8xx": "CONFIG_SCSI_SYM53C8XX_2",
    "mptsas": "CONFIG_FUSION_SAS", "ahci_platform": "CONFIG_SATA_AHCI_PLATFORM",
    # Filesystems
    "ext4": "CONFIG_EXT4_FS", "xfs": "CONFIG_XFS_FS", "vfat": "CONFIG_VFAT_FS", "overlay": "CONFIG_OVERLAY_FS",
    "squashfs": "CONFIG_SQUASHFS", "isofs": "CONFIG_ISO9660_FS", "udf": "CONFIG_UDF_FS", "fuse": "CONFIG_FUSE_FS",
    "efivarfs": "CONFIG_EFIVAR_FS", "autofs4": "CONFIG_AUTOFS_FS", "nls_cp437": "CONFIG_NLS_CODEPAGE_437",
    "nls_iso8859_1": "CONFIG_NLS_ISO8859_1", "nls_utf8": "CONFIG_NLS_UTF8",
    # Networking and netfilter
    "bridge": "CONFIG_BRIDGE", "br_netfilter": "CONFIG_BRIDGE_NETFILTER", "veth": "CONFIG_VETH",
    "8021q": "CONFIG_VLAN_8021Q", "tun": "CONFIG_TUN", "bonding": "CONFIG_BONDING", "macvlan": "CONFIG_MACVLAN",
    "ipvlan": "CONFIG_IPVLAN", "vxlan": "CONFIG_VXLAN", "dummy": "CONFIG_DUMMY", "inet_diag": "CONFIG_INET_DIAG",
    "nf_tables": "CONFIG_NF_TABLES", "nft_compat": "CONFIG_NFT_COMPAT", "nft_ct": "CONFIG_NFT_CT",
    "nft_nat": "CONFIG_NFT_NAT", "nft_chain_nat": "CONFIG_NFT_NAT", "nft_masq": "CONFIG_NFT_MASQ",
    "nft_redir": "CONFIG_NFT_REDIR", "nft_fib_inet": "CONFIG_NFT_FIB_INET", "nf_conntrack": "CONFIG_NF_CONNTRACK",
    "nf_nat": "CONFIG_NF_NAT", "nf_conntrack_netlink": "CONFIG_NF_CT_NETLINK", "x_tables": "CONFIG_NETFILTER_XTABLES",
    "xt_conntrack": "CONFIG_NETFILTER_XT_MATCH_CONNTRACK", "xt_comment": "CONFIG_NETFILTER_XT_MATCH_COMMENT",
    "xt_mark": "CONFIG_NETFILTER_XT_MARK", "xt_multiport": "CONFIG_NETFILTER_XT_MATCH_MULTIPORT",
    "xt_addrtype": "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE", "xt_MASQUERADE": "CONFIG_NETFILTER_XT_TARGET_MASQUERADE",
    "xt_nat": "CONFIG_NETFILTER_XT_NAT", "xt_REDIRECT": "CONFIG_NETFILTER_XT_TARGET_REDIRECT",
    "xt_physdev": "CONFIG_NETFILTER_XT_MATCH_PHYSDEV", "xt_statistic": "CONFIG_NETFILTER_XT_MATCH_STATISTIC",
    "xt_LOG": "CONFIG_NETFILTER_XT_TARGET_LOG", "iptable_filter": "CONFIG_IP_NF_FILTER",
    "iptable_nat": "CONFIG_IP_NF_NAT", "iptable_mangle": "CONFIG_IP_NF_MANGLE",
    "ip6table_filter": "CONFIG_IP6_NF_FILTER", "ip6table_nat": "CONFIG_IP6_NF_NAT",
    "ip6table_mangle": "CONFIG_IP6_NF_MANGLE",
    # Ethernet
    "e100": "CONFIG_E100", "e1000": "CONFIG_E1000", "e1000e": "CONFIG_E1000E", "igb": "CONFIG_IGB", "igc": "CONFIG_IGC",
    "ixgbe": "CONFIG_IXGBE", "ixgbevf": "CONFIG_IXGBEVF", "i40e": "CONFIG_I40E", "ice": "CONFIG_ICE",
    "mlx5_core": "CONFIG_MLX5_CORE", "mlx4_en": "CONFIG_MLX4_EN", "bnxt_en": "CONFIG_BNXT", "tg3": "CONFIG_TIGON3",
    "bnx2": "CONFIG_BNX2", "bnx2x": "CONFIG_BNX2X", "r8169": "CONFIG_R8169", "ena": "CONFIG_ENA_ETHERNET",
    "vmxnet3": "CONFIG_VMXNET3", "atlantic": "CONFIG_AQTION", "idpf": "CONFIG_IDPF", "be2net": "CONFIG_BE2NET",
    "qede": "CONFIG_QEDE", "enic": "CONFIG_ENIC", "ionic": "CONFIG_IONIC", "sfc": "CONFIG_SFC", "nfp": "CONFIG_NFP",
    "cxgb4": "CONFIG_CHELSIO_T4", "8139too": "CONFIG_8139TOO", "8139cp": "CONFIG_8139CP", "pcnet32": "CONFIG_PCNET32",
    # USB
    "ohci_pci": "CONFIG_USB_OHCI_HCD_PCI", "uhci_hcd": "CONFIG_USB_UHCI_HCD", "usbhid": "CONFIG_USB_HID",
    "hid_generic": "CONFIG_HID_GENERIC", "usbserial": "CONFIG_USB_SERIAL", "ftdi_sio": "CONFIG_USB_SERIAL_FTDI_SIO",
    "pl2303": "CONFIG_USB_SERIAL_PL2303", "cp210x": "CONFIG_USB_SERIAL_CP210X", "ch341": "CONFIG_USB_SERIAL_CH341",
    "cdc_acm": "CONFIG_USB_ACM", "cdc_ether": "CONFIG_USB_NET_CDCETHER", "cdc_ncm": "CONFIG_USB_NET_CDC_NCM",
    "rndis_host": "CONFIG_USB_NET_RNDIS_HOST", "ax88179_178a": "CONFIG_USB_NET_AX88179_178A",
    "r8152": "CONFIG_USB_RTL8152",
    # IPMI, TPM, ACPI, input
    "ipmi_si": "CONFIG_IPMI_SI", "ipmi_devintf": "CONFIG_IPMI_DEVICE_INTERFACE",
    "ipmi_watchdog": "CONFIG_IPMI_WATCHDOG", "ipmi_poweroff": "CONFIG_IPMI_POWEROFF", "tpm_crb": "CONFIG_TCG_CRB",
    "tpm_tis": "CONFIG_TCG_TIS",
    "button": "CONFIG_ACPI_BUTTON", "evdev": "CONFIG_INPUT_EVDEV",
    # Built by a symbol no fragment names, which Kconfig sets from the option given.
    "xhci_pci": "CONFIG_USB_XHCI_HCD",  # USB_XHCI_PCI: default y (with USB_PCI)
    "ehci_pci": "CONFIG_USB_EHCI_HCD",  # USB_EHCI_PCI: default y (with USB_PCI)
    "nft_reject_inet": "CONFIG_NFT_REJECT",  # NFT_REJECT_INET: default NFT_REJECT (with NF_TABLES_INET)
    "iavf": "CONFIG_I40EVF",  # selects IAVF
    "crc32c_generic": "CONFIG_EXT4_FS",  # selects CRYPTO_CRC32C
}
# =m options whose module the list keeps as a dependency (modules.dep), and the kept modules
# that depend on it.
DEPENDENCY_OF = {
    "CONFIG_BLK_DEV_MD": ("md_mod", {"raid0", "raid1", "raid10", "raid456"}),
    "CONFIG_USB_USBNET": ("usbnet", {"cdc_ether", "cdc_ncm", "rndis_host", "ax88179_178a"}),
    "CONFIG_QED": ("qed", {"qede"}),
}
# Where the two kernels differ, each with its reason.
DEBIAN_ONLY = {
    "crc32c_intel": "Debian's SSE4.2 provider of the crc32c alias libcrc32c asks for; ours has crc32c_generic",
}
NOT_KEPT = {
    (Arch.ARM64, "tpm_tis"): "Debian's arm64 kernel has no TPM TIS driver",
    (Arch.ARM64, "ahci_platform"): "the Debian arm64 image leaves SoC SATA out (docs/hardware.md, 'missing')",
}


def _ours(arch: Arch) -> dict[str, str]:
    """The options our fragments set for `arch`, newest series (the one Debian's kernel matches)."""
    newest = kernel_config.available_series(arch)[-1]
    return kernel_config.parse_config(kernel_config.merge_fragments(kernel_config.config_fragments(newest, arch)))


@pytest.mark.parametrize("arch", list(Arch))
def test_every_module_the_debian_list_keeps_is_one_our_fragments_build(arch: Arch) -> None:
    ours = _ours(arch)
    wrong = []
    for name in kernel_config.read_module_list(arch):
        if name in DEBIAN_ONLY:
            continue
        option = BUILT_BY.get(name)
        if option is None:
            wrong.append(f"{name}: no option known to build it (add its row to BUILT_BY)")
        elif ours.get(option, "n") not in ("y", "m"):
            wrong.append(f"{name}: {option} is {ours.get(option, 'not set')} in the {arch.value} fragments")
    assert not wrong, f"kernel/debian-modules.txt keeps what our {arch.value} kernel lacks: {wrong}"


@pytest.mark.parametrize("arch", list(Arch))
def test_every_module_our_fragments_build_is_in_the_debian_list(arch: Arch) -> None:
    kept = set(kernel_config.read_module_list(arch))
    ours = _ours(arch)
    wrong = []
    for option, value in ours.items():
        modules = [m for m, o in BUILT_BY.items() if o == option and (arch, m) not in NOT_KEPT]
        wrong += [f"{m} ({option}={value})" for m in modules if m not in kept]
        if value == "m" and option in DEPENDENCY_OF:
            module, users = DEPENDENCY_OF[option]
            if not users & kept:
                wrong.append(f"{module} ({option}=m), which none of {sorted(users)} pulls in")
        elif value == "m" and not any(o == option for o in BUILT_BY.values()):
            wrong.append(f"the module of {option}=m (add it to the list and its row to BUILT_BY)")
    assert not wrong, f"kernel/debian-modules.txt lacks what our {arch.value} kernel builds: {wrong}"


def test_the_module_tables_name_only_what_the_files_hold() -> None:
    """A row for a module the list no longer keeps, or an option no fragment sets, is stale."""
    kept = {name for arch in Arch for name in kernel_config.read_module_list(arch)}
    unkept = sorted(m for m in [*BUILT_BY, *DEBIAN_ONLY] if m not in kept and m not in {m for _, m in NOT_KEPT})
    assert not unkept, f"rows for modules kernel/debian-modules.txt does not keep: {unkept}"
    options = {o for arch in Arch for o in _ours(arch)}
    unset = sorted({*BUILT_BY.values(), *DEPENDENCY_OF} - options)
    assert not unset, f"rows for options no fragment sets: {unset}"
