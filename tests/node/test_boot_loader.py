"""The boot_loader module's reading of GRUB (it runs on the nodes' python3, so here and under
python3.9 too). grub-debian11.cfg is the grub.cfg update-grub wrote on a lab kernel510 node
after the kernel role installed 6.1 beside its 5.10; the role's integration test drives the
module against the real GRUB (make integration-kernel)."""

from __future__ import annotations

from pathlib import Path

from node_support import MODULES, ansible_module

bl = ansible_module(MODULES / "boot_loader.py")

GRUB_CFG = (Path(__file__).parent / "fixtures/grub-debian11.cfg").read_text()
UUID = "70503b99-5d63-4b03-a502-1b3a32f319dc"


def test_every_menu_entry_is_found_with_its_release_and_submenu():
    entries = bl.menu_entries(GRUB_CFG)
    assert [(e["release"], e["recovery"]) for e in entries] == [
        ("6.1.0-50-amd64", False),  # "Debian GNU/Linux": the newest kernel
        ("6.1.0-50-amd64", False),
        ("6.1.0-50-amd64", True),
        ("5.10.0-32-amd64", False),
        ("5.10.0-32-amd64", True),
    ]
    assert entries[0]["path"] == f"gnulinux-simple-{UUID}"
    assert entries[3]["path"] == (
        f"gnulinux-advanced-{UUID}>gnulinux-5.10.0-32-amd64-advanced-{UUID}"
    )
    assert entries[3]["title"] == "Debian GNU/Linux, with Linux 5.10.0-32-amd64"


def test_a_release_gets_its_own_entry_not_the_newest_kernel_one_nor_recovery():
    entries = bl.menu_entries(GRUB_CFG)
    # The generic first entry also boots 6.1 today, but would boot whatever kernel is newest
    # after the next install: pinning it would not pin a kernel.
    assert bl.entry_for(entries, "6.1.0-50-amd64") == (
        f"gnulinux-advanced-{UUID}>gnulinux-6.1.0-50-amd64-advanced-{UUID}"
    )
    assert bl.entry_for(entries, "5.10.0-32-amd64").endswith(
        f">gnulinux-5.10.0-32-amd64-advanced-{UUID}"
    )
    assert bl.entry_for(entries, "6.1.0-51-amd64") is None


def test_entries_without_ids_are_named_by_their_titles():
    text = (
        "menuentry 'Linux 5.10' {\n\tlinux /vmlinuz-5.10.0 root=/dev/vda1\n}\n"
        "submenu 'Older' {\n"
        "\tmenuentry 'Linux 4.19' {\n\t\tlinux16 /boot/vmlinuz-4.19.0 ro\n\t}\n"
        "\tmenuentry 'Linux 4.19 single' {\n\t\tlinux /boot/vmlinuz-4.19.0 ro single\n\t}\n"
        "}\n"
        "menuentry 'Memory test' {\n\tlinux16 /boot/memtest86+.bin\n}\n"
    )
    entries = bl.menu_entries(text)
    assert [e["path"] for e in entries] == [
        "Linux 5.10",
        "Older>Linux 4.19",
        "Older>Linux 4.19 single",
        "Memory test",
    ]
    assert bl.entry_for(entries, "4.19.0") == "Older>Linux 4.19"
    assert [e["release"] for e in entries] == ["5.10.0", "4.19.0", "4.19.0", None]


def test_bls_entries_are_named_by_their_file(tmp_path):
    (tmp_path / "abc-5.10.0-182.eulerosv2r13.aarch64.conf").write_text(
        "title EulerOS (5.10.0-182.eulerosv2r13.aarch64)\n"
        "version 5.10.0-182.eulerosv2r13.aarch64\n"
        "linux /vmlinuz-5.10.0-182.eulerosv2r13.aarch64\n"
        "initrd /initramfs-5.10.0-182.eulerosv2r13.aarch64.img\n"
    )
    (tmp_path / "abc-0-rescue.conf").write_text(
        "title EulerOS (0-rescue)\nlinux /vmlinuz-0-rescue-abc\n"
    )
    (tmp_path / "README").write_text("not an entry")
    entries = bl.bls_entries(str(tmp_path))
    assert len(entries) == 2
    release = "5.10.0-182.eulerosv2r13.aarch64"
    assert bl.entry_for(entries, release) == f"abc-{release}"
    assert [e["recovery"] for e in entries] == [True, False]


def test_the_environment_block_is_read_without_its_padding(tmp_path):
    env = tmp_path / "grubenv"
    body = "# GRUB Environment Block\nsaved_entry=a>b\nnext_entry=c\n"
    env.write_text(body + "#" * (1024 - len(body)))
    assert bl.read_env(str(env)) == {"saved_entry": "a>b", "next_entry": "c"}
    assert bl.read_env(str(tmp_path / "missing")) == {}


def test_boot_the_saved_entry_debian_drop_in():
    assert bl.new_default_setting("GRUB_DEFAULT=0\n", True, "") == (bl.DROP_IN, bl.DROP_IN_TEXT, "")
    assert bl.new_default_setting("GRUB_DEFAULT=0\n", True, bl.DROP_IN_TEXT) is None


def test_boot_the_saved_entry_rpm_family_edits_the_line():
    text = 'GRUB_TIMEOUT=5\nGRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="quiet"\n'
    path, wanted, old = bl.new_default_setting(text, False, "")
    assert path == bl.DEFAULTS_FILE and old == text
    assert wanted == 'GRUB_TIMEOUT=5\nGRUB_DEFAULT=saved\nGRUB_CMDLINE_LINUX="quiet"\n'
    assert bl.new_default_setting(wanted, False, "") is None
    _, appended, _ = bl.new_default_setting("GRUB_TIMEOUT=5", False, "")
    assert appended == "GRUB_TIMEOUT=5\nGRUB_DEFAULT=saved\n"


def test_installed_kernels_come_from_the_images_in_boot(tmp_path):
    for name in ("vmlinuz-5.10.0-32-amd64", "vmlinuz-6.1.0-50-amd64", "vmlinuz-6.1.0-50-amd64.old",
                 "initrd.img-5.10.0-32-amd64", "config-6.1.0-50-amd64", "grub"):  # fmt: skip
        (tmp_path / name).write_text("")
    assert bl.installed_kernels(str(tmp_path)) == ["5.10.0-32-amd64", "6.1.0-50-amd64"]
    assert bl.release_of("/boot/vmlinuz-6.1.0-50-amd64") == "6.1.0-50-amd64"
    assert bl.release_of("/Image-5.10.0") == "5.10.0"
    assert bl.release_of("/boot/memtest86+.bin") is None
