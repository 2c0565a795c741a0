"""apull.containerd.config_patch: containerd's config.toml patched for the apull proxy
snapshotter, only the intended keys changed, every other byte kept."""

from __future__ import annotations

import difflib
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from apull.containerd import config_patch as cp
from apull.containerd.config_patch import ConfigPatchError, patch_config

FIXTURES = Path(__file__).parent / "fixtures" / "containerd"
CONTAINERD = shutil.which("containerd")
CRI2 = 'plugins."io.containerd.grpc.v1.cri".containerd'
CRI3 = 'plugins."io.containerd.cri.v1.images"'
APULL_SOCK = "/run/containerd-apull-grpc.sock"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def diff(before: str, after: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), "a", "b", n=1
        )
    )


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """Lines removed from before and lines added in after (no context)."""
    removed, added = [], []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        if line.startswith("- "):
            removed.append(line[2:])
        elif line.startswith("+ "):
            added.append(line[2:])
    return removed, added


def dig(data: dict, dotted: str):
    for part in cp.parse_key_path(dotted):
        data = data[part]
    return data


def keys_of(result: cp.PatchResult) -> list[str]:
    return [c.key for c in result.changes]


# --- a hand-kept version 2 file: comments, custom keys, another proxy plugin -------------


def test_v2_custom_file_gets_only_the_intended_lines():
    before = fixture("v2_custom_nydus.toml")
    result = patch_config(before)
    print(diff(before, result.text))
    assert diff(before, result.text) == (
        "--- a\n"
        "+++ b\n"
        "@@ -20,3 +20,4 @@\n"
        '       default_runtime_name = "runc"\n'
        "-      disable_snapshot_annotations = true   # upstream default\n"
        "+      disable_snapshot_annotations = false   # upstream default\n"
        "+      discard_unpacked_layers = false\n"
        " \n"
        "@@ -37,2 +38,6 @@\n"
        " \n"
        "+  [proxy_plugins.apull]\n"
        '+    type = "snapshot"\n'
        '+    address = "/run/containerd-apull-grpc.sock"\n'
        "+\n"
        " [metrics]\n"
    )
    assert result.version == 2
    assert [c.describe() for c in result.changes] == [
        f"{CRI2}.disable_snapshot_annotations: true -> false",
        f"{CRI2}.discard_unpacked_layers: (absent) -> false",
        'proxy_plugins.apull.type: (absent) -> "snapshot"',
        f'proxy_plugins.apull.address: (absent) -> "{APULL_SOCK}"',
    ]
    data = tomllib.loads(result.text)
    assert data["proxy_plugins"]["nydus"] == tomllib.loads(before)["proxy_plugins"]["nydus"]
    assert dig(data, CRI2)["snapshotter"] == "overlayfs"


def test_v2_custom_file_with_default_snapshotter():
    before = fixture("v2_custom_nydus.toml")
    result = patch_config(before, set_default_snapshotter=True)
    removed, added = changed_lines(before, result.text)
    assert removed == [
        '      snapshotter = "overlayfs"',
        "      disable_snapshot_annotations = true   # upstream default",
    ]
    assert added == [
        '      snapshotter = "apull"',
        "      disable_snapshot_annotations = false   # upstream default",
        "      discard_unpacked_layers = false",
        "  [proxy_plugins.apull]",
        '    type = "snapshot"',
        f'    address = "{APULL_SOCK}"',
        "",
    ]
    assert f'{CRI2}.snapshotter: "overlayfs" -> "apull"' in [c.describe() for c in result.changes]


# --- version 3 (containerd 2.x): other table, literal strings kept ------------------------


def test_v3_file_gets_only_the_intended_lines():
    before = fixture("v3_custom_nydus.toml")
    result = patch_config(before, set_default_snapshotter=True)
    print(diff(before, result.text))
    assert result.version == 3
    removed, added = changed_lines(before, result.text)
    assert removed == [
        "    snapshotter = 'overlayfs'",
        "    disable_snapshot_annotations = true",
    ]
    assert added == [
        "    snapshotter = 'apull'",
        "    disable_snapshot_annotations = false",
        "    discard_unpacked_layers = false",
        "  [proxy_plugins.apull]",
        "    type = 'snapshot'",
        f"    address = '{APULL_SOCK}'",
        "",
    ]
    assert keys_of(result) == [
        f"{CRI3}.disable_snapshot_annotations",
        f"{CRI3}.discard_unpacked_layers",
        f"{CRI3}.snapshotter",
        "proxy_plugins.apull.type",
        "proxy_plugins.apull.address",
    ]
    data = tomllib.loads(result.text)
    # containerd 2.x settings stay where they are; nothing lands in the 1.x table.
    assert "io.containerd.grpc.v1.cri" not in data["plugins"]
    assert dig(data, CRI3)["max_concurrent_downloads"] == 3


# --- what the lab's nodes and containerd 1.6 write ---------------------------------------


def test_containerd_1_6_default_config():
    before = fixture("v2_default_containerd_1.6.20.toml")
    result = patch_config(before)
    print(diff(before, result.text))
    removed, added = changed_lines(before, result.text)
    # discard_unpacked_layers is already false there: left alone.
    assert removed == ["      disable_snapshot_annotations = true"]
    assert added == [
        "      disable_snapshot_annotations = false",
        "  [proxy_plugins.apull]",
        '    type = "snapshot"',
        f'    address = "{APULL_SOCK}"',
        "",
    ]
    # The new table sits under the (empty) [proxy_plugins] the default config has.
    lines = result.text.splitlines()
    at = lines.index("[proxy_plugins]")
    assert lines[at : at + 6] == [
        "[proxy_plugins]",
        "",
        "  [proxy_plugins.apull]",
        '    type = "snapshot"',
        f'    address = "{APULL_SOCK}"',
        "",
    ]
    assert lines[at + 6] == "[stream_processors]"


def test_debian_shipped_config():
    before = fixture("v2_debian_bookworm.toml")
    result = patch_config(before)
    assert diff(before, result.text) == (
        "--- a\n"
        "+++ b\n"
        "@@ -7,3 +7,10 @@\n"
        '       conf_dir = "/etc/cni/net.d"\n'
        '+    [plugins."io.containerd.grpc.v1.cri".containerd]\n'
        "+      disable_snapshot_annotations = false\n"
        "+      discard_unpacked_layers = false\n"
        '   [plugins."io.containerd.internal.v1.opt"]\n'
        '     path = "/var/lib/containerd/opt"\n'
        "+[proxy_plugins]\n"
        "+  [proxy_plugins.apull]\n"
        '+    type = "snapshot"\n'
        '+    address = "/run/containerd-apull-grpc.sock"\n'
    )


# --- every fixture: idempotent, untouched lines kept, the default snapshotter as asked ----

PATCHABLE = sorted(p.name for p in FIXTURES.glob("v[23]_*.toml"))


@pytest.mark.parametrize("name", PATCHABLE)
@pytest.mark.parametrize("set_default", [False, True])
def test_applying_twice_gives_the_same_text(name, set_default):
    once = patch_config(fixture(name), set_default_snapshotter=set_default)
    twice = patch_config(once.text, set_default_snapshotter=set_default)
    assert twice.text == once.text
    assert twice.changes == ()
    assert not twice.changed


@pytest.mark.parametrize("name", PATCHABLE)
def test_every_original_line_is_kept_unless_its_key_changed(name):
    before = fixture(name)
    result = patch_config(before, set_default_snapshotter=True)
    removed, _added = changed_lines(before, result.text)
    names = {c.path[-1] for c in result.changes if c.old is not None}
    for line in removed:
        assert line.split("=")[0].strip().split(".")[-1] in names, line


@pytest.mark.parametrize("name", PATCHABLE)
def test_default_snapshotter_only_when_asked(name):
    before = fixture(name)
    table = CRI3 if "v3" in name else CRI2
    old = tomllib.loads(before)
    try:
        old_default = dig(old, table).get("snapshotter")
    except KeyError:
        old_default = None
    kept = tomllib.loads(patch_config(before).text)
    assert dig(kept, table).get("snapshotter") == old_default
    asked = tomllib.loads(patch_config(before, set_default_snapshotter=True).text)
    assert dig(asked, table)["snapshotter"] == "apull"


@pytest.mark.parametrize("name", PATCHABLE)
def test_meaning_is_the_original_plus_the_patch(name):
    before = fixture(name)
    result = patch_config(before, proxy_address="/run/x.sock", snapshotter_name="lazy")
    expected = tomllib.loads(before)
    for change in result.changes:
        node = expected
        for part in change.path[:-1]:
            node = node.setdefault(part, {})
        node[change.path[-1]] = change.new
    assert tomllib.loads(result.text) == expected
    assert dig(expected, "proxy_plugins.lazy") == {"type": "snapshot", "address": "/run/x.sock"}


def test_existing_proxy_plugin_is_updated_and_keeps_its_other_keys():
    before = (
        "version = 2\n"
        "[proxy_plugins.apull]\n"
        '  type = "snapshot"\n'
        '  address = "/old.sock" # from an earlier install\n'
        '  capabilities = ["remap-ids"]\n'
    )
    result = patch_config(before)
    assert '  address = "/run/containerd-apull-grpc.sock" # from an earlier install\n' in (
        result.text
    )
    assert '  capabilities = ["remap-ids"]\n' in result.text
    assert "proxy_plugins.apull.type" not in keys_of(result)


# --- refusals ------------------------------------------------------------------------------


def test_version_1_is_refused_with_the_migration_command():
    with pytest.raises(ConfigPatchError) as err:
        patch_config(fixture("v1_no_version.toml"), source="/etc/containerd/config.toml")
    message = str(err.value)
    assert message.startswith("/etc/containerd/config.toml is a version 1 containerd config")
    assert "containerd config migrate" in message
    assert "config dump" in message
    assert err.value.key == "version"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 1\n", "version 1"),
        ('version = "2"\n', "unsupported config version '2'"),
        ("version = 4\n", "unsupported config version 4"),
        ("version = 2\nroot = \n", "is not valid TOML"),
        ("version = 2\n[a]\n[a]\n", "is not valid TOML"),
    ],
)
def test_bad_files_are_refused(text, message):
    with pytest.raises(ConfigPatchError, match=message):
        patch_config(text)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\ncontainerd = "runc"\n',
            CRI2,
            f"cfg.toml: {CRI2} is a string, not a table",
        ),
        (
            "version = 2\nproxy_plugins = 1\n",
            "proxy_plugins.apull",
            "cfg.toml: proxy_plugins is an integer, not a table; cannot set proxy_plugins.apull",
        ),
        (
            "version = 2\n[[plugins]]\nx = 1\n",
            CRI2,
            f"cfg.toml: plugins is an array of tables; cannot set {CRI2} in it",
        ),
    ],
)
def test_forms_that_cannot_be_edited_name_the_key(text, key, message):
    with pytest.raises(ConfigPatchError) as err:
        patch_config(text, source="cfg.toml")
    assert str(err.value) == message
    assert err.value.key == key


def test_a_table_is_not_replaced_by_a_value():
    with pytest.raises(ConfigPatchError, match="grpc is a table"):
        patch_config("version = 2\n[grpc]\naddress = '/x'\n", overrides={"grpc": "x"})


@pytest.mark.parametrize(
    ("name", "address"), [("a b", APULL_SOCK), ("apull", "relative.sock"), ("", APULL_SOCK)]
)
def test_bad_parameters_are_refused(name, address):
    with pytest.raises(ConfigPatchError):
        patch_config("version = 2\n", snapshotter_name=name, proxy_address=address)


# --- other forms of the same keys ----------------------------------------------------------


def test_dotted_keys_under_plugins():
    before = fixture("v2_dotted_keys.toml")
    result = patch_config(before, set_default_snapshotter=True)
    print(diff(before, result.text))
    removed, added = changed_lines(before, result.text)
    assert removed == ['  "io.containerd.grpc.v1.cri".containerd.snapshotter = "overlayfs"']
    assert added == [
        '  "io.containerd.grpc.v1.cri".containerd.snapshotter = "apull"',
        '  "io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations = false',
        '  "io.containerd.grpc.v1.cri".containerd.discard_unpacked_layers = false',
        "",
        "[proxy_plugins.apull]",
        '  type = "snapshot"',
        f'  address = "{APULL_SOCK}"',
    ]


def test_dotted_keys_at_the_top():
    before = (
        "version = 2\n"
        'plugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "overlayfs" # keep\n'
    )
    result = patch_config(before, set_default_snapshotter=True)
    assert result.text.splitlines()[:4] == [
        "version = 2",
        'plugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "apull" # keep',
        'plugins."io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations = false',
        'plugins."io.containerd.grpc.v1.cri".containerd.discard_unpacked_layers = false',
    ]


def test_table_under_a_dotted_key_table_goes_to_the_end():
    """tomlkit would put a new [header] in the middle of [plugins], swallowing the keys that
    follow; the patch notices and appends the table at the end instead."""
    before = (
        "version = 2\n"
        "[plugins]\n"
        '  "io.containerd.grpc.v1.cri".sandbox_image = "pause:3.6"\n'
        '  "io.containerd.internal.v1.opt".path = "/opt/containerd"\n'
    )
    result = patch_config(before)
    assert result.text.startswith(before)
    assert result.text[len(before) :] == (
        f"[{CRI2}]\n"
        "  disable_snapshot_annotations = false\n"
        "  discard_unpacked_layers = false\n"
        "[proxy_plugins.apull]\n"
        '  type = "snapshot"\n'
        f'  address = "{APULL_SOCK}"\n'
    )
    assert dig(tomllib.loads(result.text), 'plugins."io.containerd.internal.v1.opt"') == {
        "path": "/opt/containerd"
    }


def test_inline_tables():
    before = (
        "version = 2\n"
        "[plugins]\n"
        '"io.containerd.grpc.v1.cri" = { containerd = { snapshotter = "overlayfs" }, '
        'sandbox_image = "pause:3.6" }\n'
        "[proxy_plugins]\n"
        'nydus = { type = "snapshot", address = "/run/nydus.sock" }\n'
    )
    result = patch_config(before, set_default_snapshotter=True)
    lines = result.text.splitlines()
    assert lines[2] == (
        '"io.containerd.grpc.v1.cri" = { containerd = { snapshotter = "apull", '
        "disable_snapshot_annotations = false, discard_unpacked_layers = false }, "
        'sandbox_image = "pause:3.6" }'
    )
    assert lines[4] == 'nydus = { type = "snapshot", address = "/run/nydus.sock" }'
    data = tomllib.loads(result.text)
    assert data["proxy_plugins"]["apull"] == {"type": "snapshot", "address": APULL_SOCK}
    assert patch_config(result.text, set_default_snapshotter=True).text == result.text


def test_tables_out_of_order():
    before = (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        '  sandbox_image = "pause:3.6"\n'
        "[proxy_plugins.nydus]\n"
        '  type = "snapshot"\n'
        '  address = "/run/nydus.sock"\n'
        f"[{CRI2}]\n"
        '  snapshotter = "overlayfs"\n'
    )
    result = patch_config(before)
    removed, added = changed_lines(before, result.text)
    assert removed == []
    assert sorted(added) == sorted(
        [
            "[proxy_plugins.apull]",
            '  type = "snapshot"',
            f'  address = "{APULL_SOCK}"',
            "  disable_snapshot_annotations = false",
            "  discard_unpacked_layers = false",
        ]
    )


def test_a_config_with_nothing_but_its_version():
    result = patch_config("version = 2\n", set_default_snapshotter=True)
    assert result.text == (
        "version = 2\n"
        f"[{CRI2}]\n"
        "disable_snapshot_annotations = false\n"
        "discard_unpacked_layers = false\n"
        'snapshotter = "apull"\n'
        "[proxy_plugins.apull]\n"
        'type = "snapshot"\n'
        f'address = "{APULL_SOCK}"\n'
    )


def test_no_final_newline_and_crlf_line_endings():
    before = f'version = 2\r\n[{CRI2}]\r\n  snapshotter = "overlayfs"'
    result = patch_config(before)
    assert result.text.startswith(before + "\r\n")
    assert "\n" not in result.text.replace("\r\n", "")


# --- overrides -----------------------------------------------------------------------------


def test_overrides_are_applied_after_the_patch():
    before = fixture("v2_debian_bookworm.toml")
    result = patch_config(
        before,
        overrides={
            "root": "/proc/apull-rollback-test",
            f"{CRI2}.discard_unpacked_layers": True,
            'plugins."io.containerd.grpc.v1.cri".registry.config_path': "/etc/containerd/certs.d",
            "disabled_plugins": ["io.containerd.snapshotter.v1.btrfs"],
        },
    )
    data = tomllib.loads(result.text)
    assert data["root"] == "/proc/apull-rollback-test"
    assert dig(data, CRI2)["discard_unpacked_layers"] is True
    assert dig(data, 'plugins."io.containerd.grpc.v1.cri".registry.config_path') == (
        "/etc/containerd/certs.d"
    )
    assert data["disabled_plugins"] == ["io.containerd.snapshotter.v1.btrfs"]
    assert result.text.splitlines()[:2] == ["version = 2", 'root = "/proc/apull-rollback-test"']


def test_override_key_paths_are_toml_keys():
    with pytest.raises(ConfigPatchError, match="not a TOML key path"):
        patch_config("version = 2\n", overrides={"a..b": 1})
    with pytest.raises(ConfigPatchError, match="one by one"):
        patch_config("version = 2\n", overrides={"grpc": {"address": "/x"}})
    with pytest.raises(ConfigPatchError, match="not a TOML value"):
        patch_config("version = 2\n", overrides={"root": None})


@pytest.mark.parametrize(
    "parts",
    [
        ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
        ("a", "b c", 'q"uote', "x"),
        ("proxy_plugins", "apull"),
    ],
)
def test_key_paths_round_trip(parts):
    assert cp.parse_key_path(cp.format_key_path(parts)) == parts


def test_values_keep_their_toml_type():
    # true is not 1 and "false" is not false: such a value is replaced.
    before = f"version = 2\n[{CRI2}]\ndisable_snapshot_annotations = 0\n"
    result = patch_config(before)
    assert f"{CRI2}.disable_snapshot_annotations" in keys_of(result)
    assert dig(tomllib.loads(result.text), CRI2)["disable_snapshot_annotations"] is False


# --- what else the caller learns -----------------------------------------------------------


def test_notes_for_disabled_plugins_and_imports():
    before = (
        "version = 2\n"
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.apull"]\n'
        'imports = ["/etc/containerd/conf.d/*.toml"]\n'
    )
    notes = patch_config(before).notes
    assert len(notes) == 3
    assert "CRI" in notes[0]
    assert "io.containerd.snapshotter.v1.apull" in notes[1]
    assert "/etc/containerd/conf.d/*.toml" in notes[2]
    assert patch_config(fixture("v2_custom_nydus.toml")).notes == ()


def test_grpc_address():
    assert cp.grpc_address(fixture("v2_custom_nydus.toml")) == "/run/containerd/containerd.sock"
    assert cp.grpc_address("version = 2\n[grpc]\naddress = '/run/c.sock'\n") == "/run/c.sock"
    assert cp.grpc_address("version = 2\n") == cp.DEFAULT_GRPC_ADDRESS
    assert cp.grpc_address("not toml [") == cp.DEFAULT_GRPC_ADDRESS


# --- the real containerd 1.6 reads what we write -------------------------------------------


@pytest.mark.skipif(CONTAINERD is None, reason="no containerd binary on this machine")
@pytest.mark.parametrize("name", [n for n in PATCHABLE if n.startswith("v2_")])
@pytest.mark.parametrize("set_default", [False, True])
def test_containerd_accepts_the_patched_v2_files(tmp_path, name, set_default):
    path = tmp_path / "config.toml"
    path.write_text(patch_config(fixture(name), set_default_snapshotter=set_default).text)
    run = subprocess.run(
        [str(CONTAINERD), "--config", str(path), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    dump = tomllib.loads(run.stdout)
    assert dump["proxy_plugins"]["apull"] == {"type": "snapshot", "address": APULL_SOCK}
    cri = dig(dump, CRI2)
    assert cri["disable_snapshot_annotations"] is False
    assert cri["discard_unpacked_layers"] is False
    if set_default:
        assert cri["snapshotter"] == "apull"


@pytest.mark.skipif(CONTAINERD is None, reason="no containerd binary on this machine")
def test_default_fixture_is_what_this_containerd_writes():
    """The 1.6.20 fixture came from `containerd config default` on a Debian 12 host; when the
    host's containerd is that version, it still writes the same text."""
    version = subprocess.run(
        [str(CONTAINERD), "--version"], capture_output=True, text=True, check=False
    ).stdout
    if " 1.6.20" not in version:
        pytest.skip(f"containerd here is {version.strip()}")
    default = subprocess.run(
        [str(CONTAINERD), "config", "default"], capture_output=True, text=True, check=True
    ).stdout
    assert default == fixture("v2_default_containerd_1.6.20.toml")


def test_str_subclasses_from_ansible_are_plain_values():
    """Ansible passes its own str and int subclasses; they must not look like changes."""

    class Tagged(str):
        pass

    class TaggedInt(int):
        pass

    once = patch_config(fixture("v2_custom_nydus.toml"), proxy_address=Tagged(APULL_SOCK))
    twice = patch_config(
        once.text,
        proxy_address=Tagged(APULL_SOCK),
        snapshotter_name=Tagged("apull"),
        overrides={Tagged("oom_score"): TaggedInt(-999)},
    )
    assert twice.text == once.text
    assert not twice.changed


# --- registries named in hosts.toml files (plain HTTP, mirrors): config_path ------------------

REGISTRY2 = 'plugins."io.containerd.grpc.v1.cri".registry'
LAB = "registry.lab:5000"


def test_registry_hosts_set_config_path_in_debians_file():
    before = fixture("v2_debian_bookworm.toml")
    patched = patch_config(before, set_default_snapshotter=True)
    result = patch_config(before, set_default_snapshotter=True, registry_hosts=[LAB])
    assert diff(patched.text, result.text) == (
        "--- a\n"
        "+++ b\n"
        "@@ -11,2 +11,4 @@\n"
        '       snapshotter = "apull"\n'
        f"+    [{REGISTRY2}]\n"
        '+      config_path = "/etc/containerd/certs.d"\n'
        '   [plugins."io.containerd.internal.v1.opt"]\n'
    )
    assert result.hosts_dir == "/etc/containerd/certs.d"
    assert [c.describe() for c in result.changes][-1] == (
        f'{REGISTRY2}.config_path: (absent) -> "/etc/containerd/certs.d"'
    )
    again = patch_config(result.text, set_default_snapshotter=True, registry_hosts=[LAB])
    assert not again.changed and again.text == result.text
    # Without registries nothing is said about config_path, and no directory is used.
    assert patched.hosts_dir == "" and "config_path" not in patched.text


def test_an_existing_config_path_is_kept_and_its_first_directory_used():
    before = fixture("v2_default_containerd_1.6.20.toml").replace(
        'config_path = ""', 'config_path = "/etc/site/certs.d:/etc/docker/certs.d"'
    )
    assert before != fixture("v2_default_containerd_1.6.20.toml")
    result = patch_config(before, registry_hosts=[LAB], hosts_dir="/elsewhere")
    assert result.hosts_dir == "/etc/site/certs.d"
    assert not any("config_path" in c.key for c in result.changes)


def test_containerds_default_config_gets_config_path_in_its_empty_key():
    before = fixture("v2_default_containerd_1.6.20.toml")
    result = patch_config(before, registry_hosts=[LAB, "_default"])
    removed, added = changed_lines(patch_config(before).text, result.text)
    assert removed == ['      config_path = ""']
    assert added == ['      config_path = "/etc/containerd/certs.d"']


def test_the_mirror_an_earlier_apull_wrote_is_removed():
    earlier = (
        "version = 2\n"
        f'[{REGISTRY2}.mirrors."{LAB}"]\n'
        f'  endpoint = ["http://{LAB}"]\n'
        '[proxy_plugins.other]\n  type = "snapshot"\n'
    )
    result = patch_config(earlier, registry_hosts=[LAB])
    data = tomllib.loads(result.text)
    assert "mirrors" not in dig(data, REGISTRY2)
    assert dig(data, f"{REGISTRY2}.config_path") == "/etc/containerd/certs.d"
    assert dig(data, "proxy_plugins.other") == {"type": "snapshot"}
    assert f'{REGISTRY2}.mirrors."{LAB}": ' in "\n".join(c.describe() for c in result.changes)
    assert "-> (removed)" in "\n".join(c.describe() for c in result.changes)


def test_an_operators_mirror_is_refused_naming_it():
    before = (
        "version = 2\n"
        f'[{REGISTRY2}.mirrors."{LAB}"]\n'
        '  endpoint = ["https://mirror.example:443"]  # the site mirror\n'
    )
    with pytest.raises(ConfigPatchError, match=r"REGISTRY_MIRRORS") as err:
        patch_config(before, registry_hosts=[LAB])
    assert err.value.key == f'{REGISTRY2}.mirrors."{LAB}"'
    assert f"/etc/containerd/certs.d/{LAB}/hosts.toml" in str(err.value)
    # Without registries to name, the file patches as before (mirrors and all).
    assert patch_config(before).changed


def test_tls_settings_beside_config_path_are_refused():
    before = f'version = 2\n[{REGISTRY2}.configs."{LAB}".tls]\n  insecure_skip_verify = true\n'
    with pytest.raises(ConfigPatchError, match="skip_verify") as err:
        patch_config(before, registry_hosts=[LAB])
    assert err.value.key == f'{REGISTRY2}.configs."{LAB}".tls'


def test_version_3_sets_config_path_under_the_images_plugin():
    before = 'version = 3\n[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "overlayfs"\n'
    result = patch_config(before, registry_hosts=[LAB])
    assert dig(tomllib.loads(result.text), f"{CRI3}.registry.config_path") == (
        "/etc/containerd/certs.d"
    )


def test_a_relative_hosts_dir_is_refused():
    with pytest.raises(ConfigPatchError, match="not an absolute path"):
        patch_config(fixture("v2_debian_bookworm.toml"), registry_hosts=[LAB], hosts_dir="certs")


@pytest.mark.skipif(CONTAINERD is None, reason="no containerd binary on this machine")
def test_containerd_reads_config_path(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(patch_config(fixture("v2_debian_bookworm.toml"), registry_hosts=[LAB]).text)
    run = subprocess.run(
        [str(CONTAINERD), "--config", str(path), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert dig(tomllib.loads(run.stdout), f"{REGISTRY2}.config_path") == "/etc/containerd/certs.d"
