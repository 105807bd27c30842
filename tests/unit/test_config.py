import dataclasses
from pathlib import Path

import pytest

from captainos.core import config
from captainos.core.config import Accel, Arch, KernelSource, StageMode, ToolsSource
from captainos.core.errors import CaptainError
from captainos.stages import pipeline


def _load(env):
    """The configuration as the CLI reads it: the Config fields and the stage table's options."""
    return config.load(env=env, stages=pipeline.options())


def _value(cfg, name):
    return {opt.name: opt.get(cfg) for opt in (*config.options(), *pipeline.options())}[name]


def test_defaults_match_the_original_interface():
    cfg = _load({})
    assert cfg.arch is Arch.AMD64
    assert cfg.qemu_mem == "2G"
    assert cfg.qemu_smp == 2
    assert cfg.kernel_version == "6.12.69"
    assert cfg.force("kernel") is False and cfg.force("tools") is False and cfg.no_cache is False
    assert cfg.mode("kernel") is StageMode.NATIVE
    assert cfg.out_dir == Path("out")


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"ARCH": "arm64"}, "arch", Arch.ARM64),
        ({"KERNEL_SRC": "/src/linux"}, "kernel_src", Path("/src/linux")),
        ({"KERNEL_VERSION": "6.12.70"}, "kernel_version", "6.12.70"),
        ({"FORCE_KERNEL": "1"}, "force_kernel", True),
        ({"FORCE_TOOLS": "yes"}, "force_tools", True),
        ({"NO_CACHE": "true"}, "no_cache", True),
        ({"NO_CACHE": "0"}, "no_cache", False),
        ({"QEMU_APPEND": "a=b c=d=e"}, "qemu_append", "a=b c=d=e"),
        ({"QEMU_MEM": "512M"}, "qemu_mem", "512M"),
        ({"QEMU_SMP": "4"}, "qemu_smp", 4),
        ({"KERNEL_MODE": "docker"}, "kernel_mode", StageMode.DOCKER),
        ({"ISO_MODE": "skip"}, "iso_mode", StageMode.SKIP),
        ({"TOOLS_SOURCE": "go"}, "tools_source", ToolsSource.GO),
        ({"KERNEL_SOURCE": "debian-image"}, "kernel_source", KernelSource.DEBIAN_IMAGE),
        ({"QEMU_ACCEL": "tcg"}, "qemu_accel", Accel.TCG),
        ({"PROFILES": "test, debug"}, "profiles", ("test", "debug")),
        ({"CAPTAINOS_CACHE": "/var/cache/x"}, "cache_dir", Path("/var/cache/x")),
    ],
)
def test_every_env_var_is_read(env, field, expected):
    assert _value(_load(env), field) == expected


def test_flags_win_over_env():
    cfg = config.load(env={"ARCH": "arm64", "QEMU_MEM": "1G"}, flags={"arch": "amd64"})
    assert cfg.arch is Arch.AMD64
    assert cfg.qemu_mem == "1G"


def test_kernel_src_implies_local_source():
    assert config.load(env={"KERNEL_SRC": "/x"}).kernel_source is KernelSource.LOCAL


def test_kernel_src_conflicting_with_explicit_source_is_an_error():
    with pytest.raises(CaptainError, match="KERNEL_SRC is set"):
        config.load(env={"KERNEL_SRC": "/x", "KERNEL_SOURCE": "debian-image"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ARCH": "x86"}, "invalid ARCH 'x86'"),
        ({"FORCE_KERNEL": "maybe"}, "invalid FORCE_KERNEL 'maybe'"),
        ({"QEMU_SMP": "two"}, "invalid QEMU_SMP 'two'"),
        ({"QEMU_SMP": "0"}, "invalid CPU count"),
        ({"QEMU_MEM": "lots"}, "invalid qemu memory size"),
        ({"TOOLS_MIRROR": "ftp://x"}, "invalid tools mirror"),
        ({"KERNEL_MODE": "podman"}, "invalid KERNEL_MODE 'podman'"),
    ],
)
def test_bad_values_fail_with_one_clear_line(env, message):
    with pytest.raises(CaptainError) as err:
        _load(env)
    assert message in str(err.value)
    assert "\n" not in err.value.message
    assert err.value.hint


def test_every_option_declares_help_and_a_unique_env_var():
    options = (*config.options(), *pipeline.options())
    envs = [opt.env for opt in options]
    assert len(envs) == len(set(envs))
    for opt in options:
        assert opt.help, opt.name


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.load(env={}).arch = Arch.ARM64  # type: ignore[misc]


@pytest.mark.parametrize("arch", list(Arch))
def test_arch_facts(arch):
    assert arch.qemu_machine() == {"amd64": "q35", "arm64": "virt"}[arch.value]
    assert arch.smee_name() == {"amd64": "x86_64", "arm64": "aarch64"}[arch.value]
    assert arch.kernel_image().endswith({"amd64": "bzImage", "arm64": "Image"}[arch.value])
    assert arch.elf_machine() in (62, 183)
