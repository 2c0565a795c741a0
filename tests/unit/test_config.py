from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apull.config import (
    ClusterConfig,
    ConfigError,
    ConfigProblem,
    Secret,
    default_config_path,
    format_problems,
    load_config,
    parse_config,
)
from apull.lab import layout

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture(autouse=True)
def lab_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "lab-cache"
    monkeypatch.setenv("APULL_LAB_CACHE", str(cache))
    return cache


def write(tmp_path: Path, text: str, name: str = "config.txt", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str) -> ClusterConfig:
    return load_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problem lines for a config that must be rejected."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value).splitlines()


def only_problem(tmp_path: Path, text: str) -> str:
    lines = problems(tmp_path, text)
    assert len(lines) == 1, lines
    return lines[0]


SERVERS = "TARGET=servers\nSSH_USER=deploy\n"


# --- syntax -----------------------------------------------------------------------------------


def test_minimal_lab_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "SSH_USER=root\n")
    assert cfg.target == "lab"
    assert cfg.ssh_user == "root"
    assert cfg.ssh_password is None
    assert cfg.ssh_key == layout.ssh_key_path()
    assert cfg.kubeconfig_path is None
    assert cfg.registry == layout.guest_registry()
    assert cfg.registry_insecure is True
    assert cfg.warnings == ()
    assert [n.name for n in cfg.nodes] == ["node1", "node2", "node3"]
    node1 = cfg.nodes[0]
    assert (node1.host, node1.port, node1.user) == ("127.0.0.1", layout.node_ssh_port(1), "root")
    assert node1.lab_variant == "ondemand"
    assert node1.lan_addr == layout.node_lan_addr(1)


def test_shell_syntax(tmp_path: Path) -> None:
    text = """
# a comment
   # an indented comment
export TARGET=servers
  SSH_USER   =   deploy   # trailing comment
SSH_PASSWORD="a #b 'c' \\"d\\" \\\\ $HOME"  # comment after quotes
NODES='x.example.com  y.example.com' # hosts
REGISTRY=reg.example.com:5000 # comment
KUBECONFIG_PATH= # empty, so no Kubernetes
"""
    cfg = load(tmp_path, text)
    assert cfg.target == "servers"
    assert cfg.ssh_user == "deploy"
    assert cfg.ssh_password is not None
    assert cfg.ssh_password.reveal() == "a #b 'c' \"d\" \\ $HOME"
    assert [n.host for n in cfg.nodes] == ["x.example.com", "y.example.com"]
    assert cfg.registry == "reg.example.com:5000"
    assert cfg.kubeconfig_path is None


def test_hash_inside_unquoted_word_is_literal(tmp_path: Path) -> None:
    cfg = load(tmp_path, "SSH_USER=root\nSSH_PASSWORD=pa#ss # comment\n")
    assert cfg.ssh_password == Secret("pa#ss")


def test_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    path.write_bytes(b"\xef\xbb\xbfSSH_USER=root\r\nLAB_NODES='2'\r\n")
    assert len(load_config(path).nodes) == 2


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    line = only_problem(tmp_path, "SSH_USER=root\nSSH_USR=x\n")
    assert line == f"{path}:2: SSH_USR: unknown key 'SSH_USR' (did you mean SSH_USER?)"


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nFROBNICATE=1\n")
    assert line.endswith(":2: FROBNICATE: unknown key 'FROBNICATE'")


def test_line_without_equals(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\n\nTARGET lab\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:3: ")
    assert "no '='" in line and "TARGET lab" in line


def test_empty_key(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\n = value\n")
    assert line == f"{tmp_path / 'config.txt'}:2: empty key before '='"


def test_duplicate_key_names_first_line(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nTARGET=lab\n\nTARGET=lab\n")
    assert line == f"{tmp_path / 'config.txt'}:4: TARGET: duplicate key (first set on line 2)"


@pytest.mark.parametrize("value", ['"abc', "'abc", "'abc\" # x"])
def test_unterminated_quote(tmp_path: Path, value: str) -> None:
    line = only_problem(tmp_path, f"SSH_USER=root\nSSH_PASSWORD={value}\n")
    assert line == f"{tmp_path / 'config.txt'}:2: SSH_PASSWORD: unterminated {value[0]} quote"


def test_unreadable_value_does_not_cascade(tmp_path: Path) -> None:
    # SSH_USER and NODES are set, just unreadable: no "missing" or "no nodes" on top
    lines = problems(tmp_path, "TARGET=servers\nSSH_USER='deploy\nNODES=\"a b\n")
    assert [line.split(": ", 2)[1] for line in lines] == ["SSH_USER", "NODES"]


def test_text_after_closing_quote(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER='ro'ot\n")
    assert (
        line
        == f"{tmp_path / 'config.txt'}:1: SSH_USER: unexpected text after the closing quote: 'ot'"
    )


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    text = "SSH_USR=root\nTARGET=cloud\nnonsense\nLAB_NODES=99\n"
    lines = problems(tmp_path, text)
    assert len(lines) == 5, lines
    assert lines[0].startswith(f"{path}: SSH_USER: missing (required)")
    assert [line.split(": ")[0] for line in lines[1:]] == [f"{path}:{n}" for n in (1, 2, 3, 4)]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.txt")
    assert str(info.value).startswith(f"{tmp_path / 'nope.txt'}: cannot read config file")


# --- keys -------------------------------------------------------------------------------------


def test_missing_ssh_user(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "TARGET=lab\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}: SSH_USER: missing (required)")


def test_empty_ssh_user(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "TARGET=lab\nSSH_USER=''\n")
    assert line == f"{tmp_path / 'config.txt'}:2: SSH_USER: must not be empty"


def test_ssh_user_must_be_root_for_lab(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=admin\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:1: SSH_USER: must be root when TARGET=lab")
    assert "'admin'" in line


def test_bad_target(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nTARGET=cloud\n")
    assert line == f"{tmp_path / 'config.txt'}:2: TARGET: must be 'lab' or 'servers', not 'cloud'"


@pytest.mark.parametrize("value", ["0", "65536", "ssh", "-1", "22.0"])
def test_bad_ssh_port(tmp_path: Path, value: str) -> None:
    line = only_problem(tmp_path, f"{SERVERS}NODES=a\nSSH_PORT={value}\n")
    assert line == f"{tmp_path / 'config.txt'}:4: SSH_PORT: bad port '{value}' (expected 1..65535)"


def test_ssh_key_relative_to_config_dir(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("key")
    cfg = load(tmp_path, f"{SERVERS}NODES=a\nSSH_KEY=keys/id\n")
    assert cfg.ssh_key == tmp_path / "keys" / "id"


def test_ssh_key_missing_file(tmp_path: Path) -> None:
    line = only_problem(tmp_path, f"{SERVERS}NODES=a\nSSH_KEY=keys/id\n")
    assert line == f"{tmp_path / 'config.txt'}:4: SSH_KEY: no such file: {tmp_path / 'keys/id'}"


def test_kubeconfig_path(tmp_path: Path) -> None:
    (tmp_path / "kube.yaml").write_text("")
    cfg = load(tmp_path, "SSH_USER=root\nKUBECONFIG_PATH=kube.yaml\n")
    assert cfg.kubeconfig_path == tmp_path / "kube.yaml"


def test_kubeconfig_missing_file(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nKUBECONFIG_PATH=/nonexistent/kube\n")
    assert line == f"{tmp_path / 'config.txt'}:2: KUBECONFIG_PATH: no such file: /nonexistent/kube"


def test_lab_kubernetes_defaults_kubeconfig_to_the_labs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APULL_LAB_STATE", str(tmp_path / "state"))
    cfg = load(tmp_path, "SSH_USER=root\nLAB_KUBERNETES=yes\n")
    assert cfg.lab_kubernetes is True
    # Not there yet: the lab writes it when it brings the cluster up.
    assert cfg.kubeconfig_path == tmp_path / "state" / "kubernetes" / "admin.kubeconfig"
    assert cfg.kubeconfig_path == layout.admin_kubeconfig()


def test_lab_kubernetes_keeps_an_explicit_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "kube.yaml").write_text("")
    cfg = load(tmp_path, "SSH_USER=root\nLAB_KUBERNETES=1\nKUBECONFIG_PATH=kube.yaml\n")
    assert (cfg.lab_kubernetes, cfg.kubeconfig_path) == (True, tmp_path / "kube.yaml")


def test_lab_kubernetes_off_by_default_and_ignored_for_servers(tmp_path: Path) -> None:
    assert load(tmp_path, "SSH_USER=root\n").lab_kubernetes is False
    cfg = load(tmp_path, f"{SERVERS}NODES=a\nLAB_KUBERNETES=yes\n")
    assert cfg.lab_kubernetes is False
    assert cfg.kubeconfig_path is None
    assert any("LAB_KUBERNETES" in w for w in cfg.warnings), cfg.warnings


def test_lab_kubernetes_refuses_other_platforms(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nLAB_KUBERNETES=yes\nLAB_ARM64_NODES=node2\n")
    assert line == (
        f"{tmp_path / 'config.txt'}:2: LAB_KUBERNETES: the lab's Kubernetes runs on ondemand "
        "and stock nodes only, not on arm64 nodes"
    )


def test_lab_kubernetes_bad_bool(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nLAB_KUBERNETES=maybe\n")
    assert line == (
        f"{tmp_path / 'config.txt'}:2: LAB_KUBERNETES: expected true/false (or yes/no, 1/0), "
        "not 'maybe'"
    )


@pytest.mark.parametrize("value", ["yes", "True", "1", "no", "FALSE", "0"])
def test_registry_insecure_bool(tmp_path: Path, value: str) -> None:
    cfg = load(tmp_path, f"SSH_USER=root\nREGISTRY_INSECURE={value}\n")
    assert cfg.registry_insecure is (value.lower() in ("yes", "true", "1"))


def test_registry_insecure_bad_bool(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nREGISTRY_INSECURE=maybe\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:2: REGISTRY_INSECURE: expected true/false")


@pytest.mark.parametrize(
    ("value", "problem"),
    [("ftp://m:1", "expected [REGISTRY=]http(s)://host[:port]"),
     ("http://reg:5000=http://m:1", "is not a registry (HOST[:PORT])"),
     ('http://m:1/a"b', "expected [REGISTRY=]http(s)://host[:port][/path]"),
     ("docker.io=http://u:s3cret@m:1", "with a user or password in its URL")],
)  # fmt: skip
def test_registry_mirrors_named_in_the_problem(tmp_path: Path, value: str, problem: str) -> None:
    line = only_problem(tmp_path, f"SSH_USER=root\nREGISTRY_MIRRORS={value}\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:2: REGISTRY_MIRRORS: mirror ")
    assert problem in line and "s3cret" not in line


def test_prewarm_images_named_in_the_problem(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nPREWARM_IMAGES=busybox Bad/Ref::x\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:2: PREWARM_IMAGES: ")
    assert "Bad/Ref::x" in line


def test_servers_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"{SERVERS}NODES=a\n")
    assert (cfg.registry, cfg.registry_insecure, cfg.ssh_key) == ("", False, None)


def test_malformed_registry(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nREGISTRY=http://reg:5000\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:2: REGISTRY: malformed registry")


# --- lab nodes --------------------------------------------------------------------------------


def test_lab_nodes_and_stock_variant(tmp_path: Path) -> None:
    cfg = load(tmp_path, "SSH_USER=root\nLAB_NODES=4\nLAB_STOCK_NODES=node2, node4\n")
    assert [(n.name, n.lab_variant) for n in cfg.nodes] == [
        ("node1", "ondemand"),
        ("node2", "stock"),
        ("node3", "ondemand"),
        ("node4", "stock"),
    ]
    assert [n.port for n in cfg.nodes] == [layout.node_ssh_port(i) for i in range(1, 5)]


@pytest.mark.parametrize("value", ["three", "0", str(layout.MAX_NODES + 1), "-2"])
def test_lab_nodes_bad_value(tmp_path: Path, value: str) -> None:
    line = only_problem(tmp_path, f"SSH_USER=root\nLAB_NODES={value}\n")
    assert line == (
        f"{tmp_path / 'config.txt'}:2: LAB_NODES: "
        f"expected a whole number 1..{layout.MAX_NODES}, not '{value}'"
    )


def test_lab_stock_nodes_unknown_node(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "SSH_USER=root\nLAB_NODES=2\nLAB_STOCK_NODES=node1 node3\n")
    assert line == (
        f"{tmp_path / 'config.txt'}:3: LAB_STOCK_NODES: "
        "unknown lab node 'node3' (LAB_NODES=2: node1..node2)"
    )


def test_lab_bullseye_nodes(tmp_path: Path) -> None:
    cfg = load(
        tmp_path, "SSH_USER=root\nLAB_NODES=4\nLAB_STOCK_NODES=node3\nLAB_BULLSEYE_NODES=node4\n"
    )
    assert [n.lab_variant for n in cfg.nodes] == ["ondemand", "ondemand", "stock", "bullseye"]


def test_lab_arm64_nodes(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "SSH_USER=root\nLAB_NODES=3\nLAB_BULLSEYE_NODES=node2\nLAB_ARM64_NODES=node3\n",
    )
    assert [n.lab_variant for n in cfg.nodes] == ["ondemand", "bullseye", "arm64"]


def test_a_lab_node_in_two_variants_is_refused_naming_both_keys(tmp_path: Path) -> None:
    line = only_problem(
        tmp_path, "SSH_USER=root\nLAB_NODES=3\nLAB_BULLSEYE_NODES=node2\nLAB_ARM64_NODES=node2\n"
    )
    assert line == (
        f"{tmp_path / 'config.txt'}:4: LAB_ARM64_NODES: node2 is bullseye already "
        "(LAB_BULLSEYE_NODES)"
    )


def test_a_lab_node_in_two_variants_is_refused(tmp_path: Path) -> None:
    line = only_problem(
        tmp_path, "SSH_USER=root\nLAB_NODES=3\nLAB_STOCK_NODES=node3\nLAB_BULLSEYE_NODES=node3\n"
    )
    assert line == (
        f"{tmp_path / 'config.txt'}:4: LAB_BULLSEYE_NODES: node3 is stock already (LAB_STOCK_NODES)"
    )


def test_keys_of_the_other_target_are_ignored_with_a_warning(tmp_path: Path) -> None:
    cfg = load(tmp_path, "SSH_USER=root\nNODES=bad host!\nSSH_PORT=x\nSSH_KEY=\n")
    assert cfg.warnings == (
        f"{tmp_path / 'config.txt'}:2: NODES: ignored when TARGET=lab",
        f"{tmp_path / 'config.txt'}:3: SSH_PORT: ignored when TARGET=lab",
    )
    cfg = load(tmp_path, f"{SERVERS}NODES=a\nLAB_NODES=2\n")
    assert cfg.warnings == (f"{tmp_path / 'config.txt'}:4: LAB_NODES: ignored when TARGET=servers",)


# --- server nodes -----------------------------------------------------------------------------


def test_node_syntax(tmp_path: Path) -> None:
    nodes = (
        "a.example.com, ops@b.example.com:2222,10.0.0.1 [2001:db8::1]:22 "
        "2001:db8::2 root@[2001:DB8::3] c-1.example.com:2200"
    )
    cfg = load(tmp_path, f"{SERVERS}SSH_PORT=2200\nNODES='{nodes}'\n")
    assert [(n.name, n.host, n.port, n.user) for n in cfg.nodes] == [
        ("a.example.com", "a.example.com", 2200, "deploy"),
        ("b.example.com", "b.example.com", 2222, "ops"),
        ("10.0.0.1", "10.0.0.1", 2200, "deploy"),
        ("2001:db8::1", "2001:db8::1", 22, "deploy"),
        ("2001:db8::2", "2001:db8::2", 2200, "deploy"),
        ("2001:DB8::3", "2001:DB8::3", 2200, "root"),
        ("c-1.example.com", "c-1.example.com", 2200, "deploy"),
    ]
    assert all(n.lab_variant is None and n.lan_addr is None for n in cfg.nodes)


def test_same_host_on_two_ports_gets_port_suffix(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"{SERVERS}NODES=a:2201 a:2202 b\n")
    assert [n.name for n in cfg.nodes] == ["a_2201", "a_2202", "b"]


@pytest.mark.parametrize(
    "token",
    [
        "bad_host",
        "-a.example.com",
        "a..example.com",
        "10.0.0.300",
        "user@@a",
        "@a",
        "[a.example.com]:22",
        "[2001:db8::1]x",
        "[2001:db8::1",
        "a" * 64 + ".example.com",
        "2001:db8::zz",
    ],
)
def test_malformed_host_in_nodes(tmp_path: Path, token: str) -> None:
    line = only_problem(tmp_path, f"{SERVERS}NODES=ok.example.com {token}\n")
    assert line.startswith(f"{tmp_path / 'config.txt'}:3: NODES: malformed host '{token}' ")


@pytest.mark.parametrize("token", ["a:0", "a:65536", "a:ssh", "a:", "[2001:db8::1]:", "u@a:99999"])
def test_bad_port_in_nodes(tmp_path: Path, token: str) -> None:
    port = token.rsplit(":", 1)[1]
    line = only_problem(tmp_path, f"{SERVERS}NODES={token}\n")
    assert line == (
        f"{tmp_path / 'config.txt'}:3: NODES: bad port '{port}' in '{token}' (expected 1..65535)"
    )


def test_duplicate_host_in_nodes(tmp_path: Path) -> None:
    line = only_problem(tmp_path, f"{SERVERS}SSH_PORT=2200\nNODES=a b A:2200\n")
    path = tmp_path / "config.txt"
    assert line == f"{path}:4: NODES: duplicate host 'A:2200' (first listed at {path}:4)"


def test_duplicate_ipv6_in_other_spelling(tmp_path: Path) -> None:
    line = only_problem(tmp_path, f"{SERVERS}NODES=2001:db8::1 [2001:DB8:0::1]:22\n")
    assert "duplicate host '[2001:DB8:0::1]:22'" in line


def test_servers_file(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "servers.txt").write_text(
        "# legacy list\n\nb.example.com\n  c.example.com:2222   # comment\nops@d\n"
    )
    cfg = load(tmp_path, f"{SERVERS}NODES=a.example.com\nSERVERS_FILE=tools/servers.txt\n")
    assert [(n.name, n.port, n.user) for n in cfg.nodes] == [
        ("a.example.com", 22, "deploy"),
        ("b.example.com", 22, "deploy"),
        ("c.example.com", 2222, "deploy"),
        ("d", 22, "ops"),
    ]


def test_servers_file_alone_is_enough(tmp_path: Path) -> None:
    write(tmp_path, "a\n", name="servers.txt")
    cfg = load(tmp_path, f"{SERVERS}SERVERS_FILE=servers.txt\n")
    assert [n.name for n in cfg.nodes] == ["a"]


def test_malformed_host_in_servers_file_names_its_line(tmp_path: Path) -> None:
    servers = write(tmp_path, "a\n# comment\nnot_a_host\n", name="servers.txt")
    line = only_problem(tmp_path, f"{SERVERS}SERVERS_FILE=servers.txt\n")
    assert line.startswith(f"{servers}:3: malformed host 'not_a_host' ")


def test_two_hosts_on_a_servers_file_line(tmp_path: Path) -> None:
    servers = write(tmp_path, "a b\n", name="servers.txt")
    line = only_problem(tmp_path, f"{SERVERS}SERVERS_FILE=servers.txt\n")
    assert line == f"{servers}:1: expected one host per line, found 'a b'"


def test_duplicate_host_across_nodes_and_servers_file(tmp_path: Path) -> None:
    servers = write(tmp_path, "b\n\na:22\n", name="servers.txt")
    line = only_problem(tmp_path, f"{SERVERS}NODES=a\nSERVERS_FILE=servers.txt\n")
    config = tmp_path / "config.txt"
    assert line == f"{servers}:3: duplicate host 'a:22' (first listed at {config}:3)"


def test_missing_servers_file(tmp_path: Path) -> None:
    line = only_problem(tmp_path, f"{SERVERS}SERVERS_FILE=tools/servers.txt\n")
    path = tmp_path / "config.txt"
    assert line == f"{path}:3: SERVERS_FILE: no such file: {tmp_path / 'tools/servers.txt'}"


def test_servers_target_without_nodes(tmp_path: Path) -> None:
    line = only_problem(tmp_path, SERVERS)
    assert line == (
        f"{tmp_path / 'config.txt'}: NODES: TARGET=servers but no nodes: set NODES or SERVERS_FILE"
    )


def test_servers_target_with_empty_servers_file(tmp_path: Path) -> None:
    servers = write(tmp_path, "# nothing yet\n", name="servers.txt")
    line = only_problem(tmp_path, f"{SERVERS}SERVERS_FILE=servers.txt\nNODES=\n")
    assert line == (
        f"{tmp_path / 'config.txt'}:4: NODES: TARGET=servers but no nodes: {servers} lists none"
    )


# --- secrets and warnings ---------------------------------------------------------------------


def test_secret_hides_itself() -> None:
    secret = Secret(PASSWORD)
    assert repr(secret) == str(secret) == "********"
    assert f"{secret}" == "********"
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD) and secret != Secret("other")


def test_config_repr_never_shows_password(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"SSH_USER=root\nSSH_PASSWORD='{PASSWORD}'\n")
    assert cfg.ssh_password is not None and cfg.ssh_password.reveal() == PASSWORD
    assert cfg.secret("SSH_PASSWORD") == Secret(PASSWORD)
    for text in (repr(cfg), str(cfg), repr(cfg.nodes)):
        assert PASSWORD not in text
    assert "ssh_password=********" in repr(cfg)


def test_problems_never_show_password(tmp_path: Path) -> None:
    lines = problems(tmp_path, f'SSH_USER=root\nSSH_PASSWORD="{PASSWORD}"\nSSH_PASSWORD=x\n')
    assert all(PASSWORD not in line for line in lines)


def test_empty_password_is_no_password(tmp_path: Path) -> None:
    assert load(tmp_path, "SSH_USER=root\nSSH_PASSWORD=\n").ssh_password is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_warning_for_readable_file_with_password(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, f"SSH_USER=root\nSSH_PASSWORD={PASSWORD}\n", mode=mode)
    cfg = load_config(path)
    assert cfg.warnings == (
        f"{path}: SSH_PASSWORD is set and the file is readable by other users "
        f"(mode {mode:04o}); run: chmod 600 {path}",
    )


def test_no_warning_for_private_file_or_no_password(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "SSH_USER=root\nSSH_PASSWORD=x\n")).warnings == ()
    assert load_config(write(tmp_path, "SSH_USER=root\n", mode=0o644)).warnings == ()


def test_parse_config_does_not_stat_the_file(tmp_path: Path) -> None:
    cfg = parse_config("SSH_USER=root\nSSH_PASSWORD=x\n", tmp_path / "absent.txt")
    assert cfg.warnings == () and cfg.path == tmp_path / "absent.txt"


# --- rendering and paths ----------------------------------------------------------------------


def test_problem_rendering() -> None:
    path = Path("/etc/apull/config.txt")
    assert str(ConfigProblem(path, 3, "K", "bad")) == "/etc/apull/config.txt:3: K: bad"
    assert str(ConfigProblem(path, 0, "K", "bad")) == "/etc/apull/config.txt: K: bad"
    assert str(ConfigProblem(path, 3, "", "bad")) == "/etc/apull/config.txt:3: bad"
    err = ConfigError([ConfigProblem(path, 1, "A", "x"), ConfigProblem(path, 2, "B", "y")])
    assert str(err) == "/etc/apull/config.txt:1: A: x\n/etc/apull/config.txt:2: B: y"
    assert format_problems(err) == (
        "invalid configuration (2 problems):\n"
        "  /etc/apull/config.txt:1: A: x\n"
        "  /etc/apull/config.txt:2: B: y"
    )


def test_default_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APULL_CONFIG", "/somewhere/config.txt")
    assert default_config_path() == Path("/somewhere/config.txt")
    monkeypatch.delenv("APULL_CONFIG")
    repo = Path(__file__).resolve().parents[2]
    assert default_config_path() == repo / "config.txt"
    assert os.path.isdir(repo / "src" / "apull")


def test_invalid_ssh_user_name(tmp_path: Path) -> None:
    line = only_problem(tmp_path, "TARGET=servers\nNODES=a\nSSH_USER='de ploy'\n")
    assert line == f"{tmp_path / 'config.txt'}:3: SSH_USER: not a valid user name: 'de ploy'"


def test_an_ipv6_node_prints_in_brackets(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"{SERVERS}NODES=[fe80::1]:2222 ops@10.0.0.1\n")
    assert [n.endpoint for n in cfg.nodes] == ["deploy@[fe80::1]:2222", "ops@10.0.0.1:22"]
    config = str(tmp_path / "config.txt")
    done = subprocess.run(
        [sys.executable, "-m", "apull.cli", "--config", config, "config", "check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ": deploy@[fe80::1]:2222" in done.stdout
