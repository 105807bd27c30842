"""stages/kernel_patch.py: the patches to the kernel tree (COMMAND_LINE_SIZE, the default of
INIT_ENV_ARG_LIMIT and of initramfs_options=) and the bzImage header that proves the first."""

from __future__ import annotations

from pathlib import Path

import pytest

from captainos.core.config import Arch
from captainos.core.errors import CaptainError
from captainos.stages import kernel_patch

# init/Kconfig of Linux 6.12 around the symbol (the real text, tabs included).
INIT_KCONFIG = """config CC_VERSION_TEXT
\tstring

config INIT_ENV_ARG_LIMIT
\tint
\tdefault 32 if !UML
\tdefault 128 if UML
\thelp
\t  Maximum of each of the number of arguments and environment
\t  variables passed to init from the kernel command line.

config COMPILE_TEST
\tbool "Compile also drivers which will not load"
\tdefault n
"""


def _fake_tree(root: Path) -> Path:
    """The files of a 6.12 tree the patches touch, as Linux has them."""
    (root / "arch" / "x86" / "include" / "asm").mkdir(parents=True)
    (root / "arch" / "x86" / "include" / "asm" / "setup.h").write_text(
        "#ifndef _ASM_X86_SETUP_H\n#define COMMAND_LINE_SIZE 2048\n#endif\n")
    (root / "init").mkdir()
    (root / "init" / "Kconfig").write_text(INIT_KCONFIG)
    return root


# --- COMMAND_LINE_SIZE -------------------------------------------------------------------

def test_patch_command_line_size(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    header = kernel_patch.patch_command_line_size(tree, Arch.AMD64)
    assert "#define COMMAND_LINE_SIZE 4096\n" in header.read_text()
    assert "_ASM_X86_SETUP_H" in header.read_text()
    kernel_patch.patch_command_line_size(tree, Arch.AMD64)  # idempotent
    assert header.read_text().count("COMMAND_LINE_SIZE") == 1


def test_patch_arm64_uapi_header(tmp_path: Path) -> None:
    header = tmp_path / "arch/arm64/include/uapi/asm/setup.h"
    header.parent.mkdir(parents=True)
    header.write_text("#include <linux/types.h>\n\n#define COMMAND_LINE_SIZE\t2048\n")
    kernel_patch.patch_command_line_size(tmp_path, Arch.ARM64)
    assert header.read_text().endswith("#define COMMAND_LINE_SIZE\t4096\n")


def test_patch_fails_loudly_without_the_define(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    (tree / "arch/x86/include/asm/setup.h").write_text("/* moved */\n")
    with pytest.raises(CaptainError, match="no '#define COMMAND_LINE_SIZE'"):
        kernel_patch.patch_command_line_size(tree, Arch.AMD64)


def test_patch_refuses_two_defines(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    (tree / "arch/x86/include/asm/setup.h").write_text("#define COMMAND_LINE_SIZE 2048\n#define COMMAND_LINE_SIZE 1\n")
    with pytest.raises(CaptainError, match="2 times"):
        kernel_patch.patch_command_line_size(tree, Arch.AMD64)


def test_patch_init_env_limit(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    kconfig = kernel_patch.patch_init_env_limit(tree)
    text = kconfig.read_text()
    assert "\tdefault 128 if !UML\n\tdefault 128 if UML\n" in text
    assert "config COMPILE_TEST\n\tbool" in text and "\tdefault n\n" in text  # nothing else touched
    kernel_patch.patch_init_env_limit(tree)  # idempotent
    assert kconfig.read_text() == text


def test_patch_init_env_limit_fails_loudly_when_the_symbol_moved(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "linux")
    (tree / "init" / "Kconfig").write_text(INIT_KCONFIG.replace("default 32 if !UML", "default 32"))
    with pytest.raises(CaptainError, match="non-UML defaults of INIT_ENV_ARG_LIMIT"):
        kernel_patch.patch_init_env_limit(tree)


NAMESPACE_C = """static char * __initdata initramfs_options;
static int __init initramfs_options_setup(char *str)
{
	initramfs_options = str;
	return 1;
}
"""


def test_patch_initramfs_options_sets_the_default_once(tmp_path: Path) -> None:
    (tmp_path / "fs").mkdir()
    source = tmp_path / "fs" / "namespace.c"
    source.write_text(NAMESPACE_C)
    assert kernel_patch.patch_initramfs_options(tmp_path)
    text = source.read_text()
    assert text == NAMESPACE_C.replace("initramfs_options;", 'initramfs_options = "size=90%";', 1)
    assert kernel_patch.patch_initramfs_options(tmp_path) and source.read_text() == text  # idempotent
    assert kernel_patch.patch_initramfs_options(tmp_path, "size=80%")  # a changed value replaces the old one
    assert source.read_text().count('initramfs_options = "size=80%";') == 1


def test_a_kernel_without_initramfs_options_is_a_warning(tmp_path: Path, capsys) -> None:
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs" / "namespace.c").write_text("static int other;\n")
    assert not kernel_patch.patch_initramfs_options(tmp_path)
    assert "has no initramfs_options" in capsys.readouterr().err
    assert (tmp_path / "fs" / "namespace.c").read_text() == "static int other;\n"


def test_bzimage_cmdline_size(tmp_path: Path) -> None:
    image = bytearray(0x300)
    image[0x202:0x206] = b"HdrS"
    image[0x238:0x23C] = (4095).to_bytes(4, "little")
    (tmp_path / "bzImage").write_bytes(bytes(image))
    assert kernel_patch.bzimage_cmdline_size(tmp_path / "bzImage") == 4095
    (tmp_path / "Image").write_bytes(bytes(0x300))
    with pytest.raises(CaptainError, match="not an x86 bzImage"):
        kernel_patch.bzimage_cmdline_size(tmp_path / "Image")
