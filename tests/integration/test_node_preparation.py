"""`make all` end to end on the lab: preflight names what the stock node lacks, check mode
changes nothing, the site playbook upgrades the stock node through the real path (apt from
the lab's repository, one reboot) and deploys the stack on every node (containerd pulls and
runs an image through the apull snapshotter), a second run changes, reboots and restarts
nothing, everything survives a plain reboot, and `make clean` puts containerd's config back
byte for byte.

The tests run in file order and build on each other's effect on the lab."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, apull, boot_id, package_installed, recap, run_on
from lazy_image import (
    BIG,
    CRI,
    K8S_CTR,
    OTHER,
    LazyImage,
    apulld_ping,
    fetched,
    forget_image,
    push_and_convert,
    run_lazily,
)
from lazy_image import (
    REPO as LAZY_REPO,
)

from apull.lab import layout, nodes
from apull.lab.registry import access_log
from apull.lab.test_image import REPO, TAG
from apull.testing.pull_through import PullThroughCache
from apull_node.daemon.registry_fetch import MIRROR_FILLING_SECONDS

#: A registry access-log line: repository, bytes sent, user agent.
ACCESS_LINE = re.compile(r'"GET /v2/(?P<repo>[^ ]+?)/(?:blobs|manifests)/[^ ]* [^"]*" \d+ '
                         r'(?P<bytes>\d+) "[^"]*" "(?P<agent>[^"]*)"')  # fmt: skip
boot_ids: dict[str, str] = {}
IMAGE = f"{layout.guest_registry()}/{REPO}:{TAG}"
CONFIG = "/etc/containerd/config.toml"
#: containerd's config before anything of ours ran: "inode sha256" or "absent".
pristine: dict[str, str] = {}
#: "MainPID ActiveEnterTimestampMonotonic" of containerd and both services after the deploy.
service_starts: dict[str, str] = {}
SERVICES = "containerd.service apulld.service apull-snapshotter.service"


def config_state(node: layout.LabNode) -> str:
    res = run_on(node, f"test -e {CONFIG} && stat -c %i {CONFIG} && sha256sum {CONFIG}")
    return " ".join(res.stdout.split()[:2]) if res.returncode == 0 else "absent"


def starts(node: layout.LabNode) -> str:
    cmd = f"systemctl show -p MainPID -p ActiveEnterTimestampMonotonic {SERVICES}"
    return run_on(node, cmd).stdout


def runs_an_image_through_apull(node: layout.LabNode, name: str) -> None:
    plugins = run_on(node, "ctr plugins ls").stdout
    assert re.search(r"^io\.containerd\.snapshotter\.v1\s+apull\s+\S+\s+ok\s*$", plugins, re.M), (
        plugins
    )
    pull = run_on(node, f"ctr images pull --plain-http --snapshotter apull {IMAGE}")
    assert pull.returncode == 0, pull.stderr
    run = run_on(node, f"ctr run --rm --snapshotter apull {IMAGE} {name} echo hi")
    assert run.stdout.strip() == "hi", run.stderr
    snapshots = run_on(node, "ctr snapshots --snapshotter apull ls").stdout
    assert "Committed" in snapshots, snapshots


@pytest.fixture(scope="module")
def stock(lab, stock_nodes):
    """The stock node; the session's `lab` fixture made sure it really is stock."""
    return stock_nodes[0]


def test_preflight_names_what_the_stock_node_lacks_and_the_fix(lab, stock):
    pristine.update({n.name: config_state(n) for n in lab})
    result = apull("run", "preflight", "--no-lab")
    out = result.stdout
    assert result.returncode == 2, out[-2000:]
    assert (
        f"{stock.name} does not qualify: [1] no usable backend: fscache on-demand unsupported "
        "(rejected: EINVAL), no EROFS file-backed mounts -> fix: ansible-playbook "
        "playbooks/kernel.yml (part of make all)."
    ) in out
    hosts = recap(out)
    for node in lab:
        failed = hosts[node.name][3]
        assert failed == (1 if node.variant == "stock" else 0), node.name
    report = json.loads((ROOT / ".apull/reports/preflight-last.json").read_text())
    for node in lab:
        facts = report["nodes"][node.name]
        expected = "none" if node.variant == "stock" else "fscache"
        assert facts["backend"] == expected
        assert facts["backend_source"] == "kernel facts"  # apulld is not installed yet
        # the status table's BACKEND column: the backend and the short reason
        why = (
            "no on-demand (rejected: EINVAL), no EROFS file-backed"
            if node.variant == "stock"
            else f"on-demand {facts['ondemand']}"
        )
        assert facts["backend_why"] == why
        # the PLATFORM column first: what the node binaries would run on there
        platform = report["platforms"][node.name]
        assert platform["text"] == f"x86_64, glibc {platform['glibc']}, python3 3.11"
        assert platform["supported"] is True
        assert re.search(
            rf"^{node.name}\s+{re.escape(platform['text'])}\s+\S+\s+\S+\s+{expected} "
            rf"\({re.escape(why)}\)\s",
            out,
            re.M,
        )
    assert report["nodes"][stock.name]["backend_reasons"] == [
        "fscache: on-demand unsupported (rejected: EINVAL)",
        "file: kernel 6.1.0-50-amd64 cannot mount EROFS from a file "
        "(CONFIG_EROFS_FS_BACKED_BY_FILE is not set)",
        "none: no cache backend available; image data cannot be served",
    ]


def test_check_diff_reports_the_upgrade_and_changes_nothing(lab, stock):
    before = {n.name: boot_id(n) for n in lab}
    result = apull("run", "site", "--no-lab", "--check", "--diff")
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    assert (
        "would install apull-ondemand-modules-6.1.0-50-amd64 from the repository "
        'deb [trusted=yes] http://repo.lab/ ./ with apt, then reboot"'
    ) in out
    assert re.search(rf"^{stock.name}\s.*would change", out, re.M)
    assert {n.name: boot_id(n) for n in lab} == before
    assert not package_installed(stock)
    assert run_on(stock, "ls /etc/apt/sources.list.d/").stdout.strip() == ""


def test_site_upgrades_the_stock_node_with_one_reboot(lab, stock):
    before = {n.name: boot_id(n) for n in lab}
    started = time.monotonic()
    result = apull("run", "site", "--no-lab")
    took = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    print(f"first site run with the upgrade: {took:.0f} s")
    for node in lab:
        boot_ids[node.name] = boot_id(node)
        rebooted = boot_ids[node.name] != before[node.name]
        assert rebooted == (node is stock), node.name
    assert package_installed(stock)
    assert "/updates/" in run_on(stock, "modinfo -F filename cachefiles").stdout
    for param in ("erofs_enabled", "cachefiles_ondemand_enabled"):
        assert run_on(stock, f"cat /sys/module/fs_ctl/parameters/{param}").stdout.strip() == "Y"
    report = json.loads((ROOT / ".apull/reports/site-last.json").read_text())
    assert report["nodes"][stock.name]["backend"] == "fscache"
    # the verify step's probe finds apulld holding /dev/cachefiles: the deploy took it
    assert report["nodes"][stock.name]["probe"].startswith("skipped: held by apulld"), report
    for node in lab:
        runs_an_image_through_apull(node, "hi-after-deploy")
        state = config_state(node)
        if pristine[node.name] != "absent":  # patched in place: same inode, new content
            assert state.split()[0] == pristine[node.name].split()[0], node.name
            assert state != pristine[node.name], node.name
        service_starts[node.name] = starts(node)


def test_second_site_run_changes_nothing_and_reboots_nothing(lab, stock, hosts):
    uptime = float(run_on(stock, "cut -d' ' -f1 /proc/uptime").stdout)
    started = time.monotonic()
    result = apull("run", "site", "--no-lab")
    print(f"second site run: {time.monotonic() - started:.0f} s")
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    for host, (_, changed, unreachable, failed) in recap(out).items():
        assert (changed, unreachable, failed) == (0, 0, 0), host
    for node in lab:
        assert boot_id(node) == boot_ids[node.name], f"{node.name} rebooted"
        assert re.search(rf"^{node.name}\s.*no change$", out, re.M)
    assert float(run_on(stock, "cut -d' ' -f1 /proc/uptime").stdout) > uptime
    for node in lab:  # containerd and the services were not restarted
        assert starts(node) == service_starts[node.name], node.name
    report = json.loads((ROOT / ".apull/reports/site-last.json").read_text())
    for node in lab:
        facts = report["nodes"][node.name]
        assert facts["kernel"] == hosts[node.name].sysctl("kernel.osrelease")
        assert facts["containerd"].startswith("1.6.")
        state = (facts["backend"], facts["ondemand"], facts["problems"])
        assert state == ("fscache", "enabled", [])
        # the running apulld was asked: its own answer fills the BACKEND column
        assert facts["backend_source"] == "apulld"
        # (after a restart apulld words it "... fd (bound on-demand) taken back ...")
        assert facts["backend_reasons"][0].startswith("fscache: /dev/cachefiles ")
        assert "bound on-demand" in facts["backend_reasons"][0]
        assert re.search(
            rf"^{node.name}\s+x86_64, glibc \S+, python3 \S+\s+\S+\s+\S+\s+"
            r"fscache \(apulld: /dev/cachefiles .*bound on-demand",
            out,
            re.M,
        )


def test_prepared_nodes_pass_preflight(lab):
    result = apull("run", "preflight", "--no-lab")
    assert result.returncode == 0, result.stdout[-2000:]
    assert all(v[3] == 0 for v in recap(result.stdout).values())


def test_gate_and_modules_survive_a_plain_reboot(lab, stock):
    node = stock
    old = boot_id(node)
    run_on(node, "systemctl reboot")
    deadline = time.monotonic() + 600
    while True:
        time.sleep(5)
        try:
            current = boot_id(node)
        except subprocess.TimeoutExpired:
            current = ""
        if current and current != old:
            break
        assert time.monotonic() < deadline, f"{node.name} did not come back"
    # ssh answers before multi-user.target is reached: wait for the boot to finish
    settled = nodes.ssh(node, "timeout 300 systemctl is-system-running --wait", timeout=330)
    assert settled.stdout.strip() in ("running", "degraded"), settled.stdout
    for param in ("erofs_enabled", "cachefiles_ondemand_enabled"):
        assert run_on(node, f"cat /sys/module/fs_ctl/parameters/{param}").stdout.strip() == "Y"
    for module in ("cachefiles", "erofs"):
        assert run_on(node, f"test -d /sys/module/{module}/sections").returncode == 0
    times = run_on(
        node,
        "systemctl show -p ActiveEnterTimestampMonotonic --value apull-fs-ctl.service "
        "systemd-modules-load.service containerd.service",
    ).stdout.split()
    gate, modules, containerd = (int(t) for t in times)
    assert 0 < modules <= gate <= containerd
    before = run_on(node, "systemctl show -p Before --value apull-fs-ctl.service").stdout
    assert {"containerd.service", "apulld.service", "apull-snapshotter.service"} <= set(
        before.split()
    )
    for service in ("apulld.service", "apull-snapshotter.service"):
        assert run_on(node, f"systemctl is-active {service}").stdout.strip() == "active"
    snapshotter_ready, containerd_up = (
        int(t)
        for t in run_on(
            node,
            "systemctl show -p ActiveEnterTimestampMonotonic --value "
            "apull-snapshotter.service containerd.service",
        ).stdout.split()
    )
    assert 0 < snapshotter_ready <= containerd_up
    runs_an_image_through_apull(node, "hi-after-reboot")


# -- lazy pulls on the deployed stack (fscache backend on the ondemand nodes) ----------------


@pytest.fixture(scope="module")
def lazy_image() -> LazyImage:
    return push_and_convert()


@pytest.fixture(scope="module")
def lazy_node(lab, ondemand_nodes) -> Iterator[layout.LabNode]:
    node = ondemand_nodes[0]
    yield node
    run_on(
        node, f"{CRI} rmi {IMAGE} >/dev/null 2>&1; ip route del prohibit 10.0.2.100/32 2>/dev/null"
    )


def test_converted_image_runs_lazily_over_fscache(lazy_node, lazy_image):
    run_lazily(lazy_node, lazy_image, "lazy1")


def test_apulld_restart_while_a_container_reads(lazy_node, lazy_image):
    node = lazy_node
    pid = run_on(node, "systemctl show -p MainPID --value apulld").stdout.strip()
    run_on(node, "rm -f /run/lazy2.out /run/lazy2.rc")
    started = run_on(
        node,
        f"nohup sh -c '{K8S_CTR} run --rm --snapshotter apull {lazy_image.ref} lazy2 "
        f"sha256sum /{BIG} > /run/lazy2.out 2>&1; echo $? > /run/lazy2.rc' >/dev/null 2>&1 &",
    )
    assert started.returncode == 0, started.stderr
    # Restart once the big file is being fetched (and the container has not finished).
    base = fetched(node)
    deadline = time.monotonic() + 300
    while fetched(node) - base < (2 << 20):
        assert time.monotonic() < deadline, "the container never started reading"
        time.sleep(0.3)
    restart = run_on(node, "test ! -e /run/lazy2.rc && systemctl restart apulld")
    assert restart.returncode == 0, "the read finished before the restart: make the file bigger"
    deadline = time.monotonic() + 600
    while run_on(node, "test -e /run/lazy2.rc").returncode != 0:
        assert time.monotonic() < deadline, "the reading container did not finish"
        time.sleep(2)
    out = run_on(node, "cat /run/lazy2.out /run/lazy2.rc").stdout.split()
    assert out[0] == lazy_image.sha256(BIG) and out[-1] == "0", out
    assert run_on(node, "systemctl show -p MainPID --value apulld").stdout.strip() != pid


def test_registry_down_is_a_clear_error_and_the_node_stays_healthy(lazy_node, lazy_image):
    node = lazy_node
    since = run_on(node, "date +%s").stdout.strip()
    # The registry's address as the node reaches it (QEMU's guestfwd) becomes unreachable.
    assert run_on(node, "ip route add prohibit 10.0.2.100/32").returncode == 0
    try:
        run = nodes.ssh(
            node,
            f"{K8S_CTR} run --rm --snapshotter apull {lazy_image.ref} lazy3 sha256sum /{OTHER}",
            timeout=600,
        )
        assert run.returncode != 0 and lazy_image.sha256(OTHER) not in run.stdout, run.stdout
        log = run_on(node, f"journalctl -u apulld --since @{since} --no-pager").stdout
        assert "registry.lab:5000" in log and "test/lazy" in log, log[-3000:]
        for service in ("apulld", "apull-snapshotter", "containerd"):
            assert run_on(node, f"systemctl is-active {service}").stdout.strip() == "active"
        assert apulld_ping(node)["backend"] == "fscache"
    finally:
        run_on(node, "ip route del prohibit 10.0.2.100/32")
    time.sleep(3)  # past apulld's short memory of a failed registry
    again = nodes.ssh(
        node,
        f"{K8S_CTR} run --rm --snapshotter apull {lazy_image.ref} lazy4 sha256sum /{OTHER}",
        timeout=600,
    )
    assert again.stdout.split()[:1] == [lazy_image.sha256(OTHER)], again.stderr


def scrape(node: layout.LabNode, port: int) -> dict[str, float]:
    """The node's metrics endpoint on loopback, read there: sample (with labels) -> value."""
    url = f"http://127.0.0.1:{port}/metrics"
    res = run_on(node, f"python3 -c 'import urllib.request as u; "
                       f"print(u.urlopen(\"{url}\").read().decode())'")  # fmt: skip
    assert res.returncode == 0, res.stderr
    samples = {}
    for line in res.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_the_services_metrics_count_what_the_lazy_runs_did(lazy_node):
    """The lab's group_vars switch metrics on: real counts from the runs above."""
    apulld = scrape(lazy_node, 9810)
    assert apulld['apull_registry_fetched_bytes_total{kind="layer"}'] > 0
    assert apulld['apull_served_bytes_total{backend="fscache"}'] > 0
    assert apulld["apull_registry_fetch_duration_seconds_count"] > 0
    # The registry-down test: the registry could not be reached, counted as no answer.
    assert apulld['apull_registry_errors_total{status="error"}'] > 0
    snapshotter = scrape(lazy_node, 9811)
    prepared = [v for k, v in snapshotter.items()
                if k.startswith("apull_snapshotter_prepare_duration_seconds_count")]  # fmt: skip
    assert sum(prepared) > 0, snapshotter
    mounted = [v for k, v in snapshotter.items()
               if k.startswith("apull_snapshotter_mount_duration_seconds_count")]  # fmt: skip
    assert sum(mounted) > 0, snapshotter


def _apulld_bytes(samples: dict[str, float]) -> int:
    return int(sum(v for k, v in samples.items()
                   if k.startswith("apull_registry_fetched_bytes_total{")))  # fmt: skip


def _served_to_apulld(offset: int) -> int:
    """Bytes the registry sent for test/lazy since `offset` of its access log, except to
    containerd (its own manifest and config reads) and to this host (pushes, conversion)."""
    with access_log().open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    total = 0
    for m in ACCESS_LINE.finditer(text):
        if m["repo"] == LAZY_REPO and not m["agent"].startswith(("containerd/", "Python-")):
            total += int(m["bytes"])
    return total


def test_the_bytes_fetched_metric_matches_the_registrys_access_log(lazy_node, lazy_image):
    """A cold lazy run (apulld restarted by it: its counters start at zero): what apulld counts
    as fetched is what the registry's access log says it sent apulld, byte for byte."""
    # apulld stopped first: the read-ahead of an earlier read cannot land after the offset.
    forget_image(lazy_node, lazy_image.ref)
    offset = access_log().stat().st_size
    run_lazily(lazy_node, lazy_image, "lazy-metrics")
    deadline = time.monotonic() + 120
    while True:  # the warm-up may still be fetching in the background: until both settle
        counted, served = _apulld_bytes(scrape(lazy_node, 9810)), _served_to_apulld(offset)
        if counted == served or time.monotonic() > deadline:
            break
        time.sleep(3)
    print(f"{lazy_node.name}: apulld counted {counted} bytes fetched; the registry's log "
          f"says {served}")  # fmt: skip
    assert counted > 0 and counted == served


# -- a registry mirror named once in config.txt: containerd's hosts.toml and apulld -----------

MIRROR = f"http://{layout.GUEST_MIRROR_ADDR}:{layout.REGISTRY_PORT}"
HOSTS_TOML = f"/etc/containerd/certs.d/{layout.guest_registry()}/hosts.toml"


def deploy_with(node: layout.LabNode, tmp_path, mirrors: str) -> subprocess.CompletedProcess[str]:
    """playbooks/deploy.yml on one node, with config.txt as shipped but for REGISTRY_MIRRORS."""
    config = tmp_path / "config.txt"
    shipped = (ROOT / "config.txt").read_text()
    assert re.search(r"^REGISTRY_MIRRORS=$", shipped, re.M), "config.txt names no mirror slot"
    config.write_text(re.sub(r"^REGISTRY_MIRRORS=$", f"REGISTRY_MIRRORS={mirrors}", shipped,
                             flags=re.M))  # fmt: skip
    env = {**os.environ, "APULL_CONFIG": str(config), "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i",
         "inventory/apull_inventory.py", "playbooks/deploy.yml", "--limit", node.name],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pull_through(lab) -> Iterator[PullThroughCache]:
    """A pull-through cache of the lab registry, which the nodes reach as MIRROR."""
    cache = PullThroughCache(layout.state_dir() / "pull-through", layout.host_registry(),
                             port=layout.HOST_MIRROR_PORT)  # fmt: skip
    cache.start()
    yield cache
    cache.stop()


def read_big_file(node: layout.LabNode, image: LazyImage, name: str) -> float:
    """Seconds a cold container takes to read and hash the big file (checked)."""
    started = time.monotonic()
    run = nodes.ssh(node, f"{K8S_CTR} run --rm --snapshotter apull {image.ref} {name} "
                          f"sha256sum /{BIG}", timeout=900)  # fmt: skip
    assert run.stdout.split()[:1] == [image.sha256(BIG)], run.stdout + run.stderr
    return time.monotonic() - started


def test_a_mirror_in_config_txt_reaches_containerd_and_apulld(
    lazy_node, lazy_image, pull_through, tmp_path
):
    node = lazy_node
    result = deploy_with(node, tmp_path, f"{layout.guest_registry()}={MIRROR}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    hosts = run_on(node, f"cat {HOSTS_TOML}").stdout
    assert f'[host."{MIRROR}"]' in hosts and f'server = "http://{layout.guest_registry()}"' in hosts
    settings = run_on(node, "cat /etc/apull/config.toml").stdout
    assert f'registry_mirrors = ["{layout.guest_registry()}={MIRROR}"]' in settings, settings
    # containerd resolves through the mirror, apulld reads the layers through it.
    forget_image(node, lazy_image.ref)
    pull = nodes.ssh(node, f"{CRI} pull --json {lazy_image.ref}", timeout=300)
    assert pull.returncode == 0, pull.stderr
    asked = pull_through.requests()
    assert any(u.startswith(f"/v2/{LAZY_REPO}/manifests/") for u in asked), asked
    # A cold pull-through cache answers a range with the whole blob while it stores it;
    # apulld then reads that blob from the origin for MIRROR_FILLING_SECONDS. A read whose
    # ranges all fell within that window got nothing from the mirror (CI: reads of 9.3 and
    # 10.1 s): a second cold read, by a restarted apulld after the window, must.
    for attempt in (1, 2):
        seconds = read_big_file(node, lazy_image, f"mirror{attempt}")
        stats = apulld_ping(node)["serving"]["stats"]
        blobs = [u for u in pull_through.requests() if u.startswith(f"/v2/{LAZY_REPO}/blobs/")]
        print(f"{node.name}: cold read {attempt} of {BIG} through the pull-through cache "
              f"{seconds:.1f} s; {stats.get('bytes_from_mirrors', 0)} of "
              f"{stats.get('bytes_fetched', 0)} bytes from the mirror; {len(blobs)} blob "
              f"requests in its log")  # fmt: skip
        if stats.get("bytes_from_mirrors", 0) > 0 or attempt == 2:
            break
        time.sleep(MIRROR_FILLING_SECONDS)
        forget_image(node, lazy_image.ref)
        pull = nodes.ssh(node, f"{CRI} pull --json {lazy_image.ref}", timeout=300)
        assert pull.returncode == 0, pull.stderr
    assert blobs and stats.get("bytes_from_mirrors", 0) > 0, (blobs, stats)


def test_the_mirror_stopped_mid_read_the_read_completes_from_the_origin(
    lazy_node, lazy_image, pull_through
):
    node = lazy_node
    # The mirror holds the whole blob now: a cold read from it is the baseline.
    forget_image(node, lazy_image.ref)
    assert nodes.ssh(node, f"{CRI} pull {lazy_image.ref}", timeout=300).returncode == 0
    baseline = read_big_file(node, lazy_image, "mirror2")
    forget_image(node, lazy_image.ref)
    assert nodes.ssh(node, f"{CRI} pull {lazy_image.ref}", timeout=300).returncode == 0
    run_on(node, "rm -f /run/mirror3.out /run/mirror3.rc")
    from_mirror_before = apulld_ping(node)["serving"]["stats"].get("bytes_from_mirrors", 0)
    started = time.monotonic()
    launched = run_on(
        node,
        f"nohup sh -c '{K8S_CTR} run --rm --snapshotter apull {lazy_image.ref} mirror3 "
        f"sha256sum /{BIG} > /run/mirror3.out 2>&1; echo $? > /run/mirror3.rc' >/dev/null 2>&1 &",
    )
    assert launched.returncode == 0, launched.stderr
    base = fetched(node)
    deadline = time.monotonic() + 300
    while fetched(node) - base < (4 << 20):
        assert time.monotonic() < deadline, "the container never started reading"
        time.sleep(0.2)
    assert run_on(node, "test ! -e /run/mirror3.rc").returncode == 0, "read done before the stop"
    origin_log = access_log().stat().st_size
    stopping = time.monotonic()
    pull_through.stop()
    stopped_in = time.monotonic() - stopping
    from_mirror_at_stop = (
        apulld_ping(node)["serving"]["stats"].get("bytes_from_mirrors", 0) - from_mirror_before
    )
    assert from_mirror_at_stop > 0, "the read did not go through the mirror"
    deadline = time.monotonic() + 600
    while run_on(node, "test -e /run/mirror3.rc").returncode != 0:
        assert time.monotonic() < deadline, "the reading container did not finish"
        time.sleep(0.5)
    seconds = time.monotonic() - started
    out = run_on(node, "cat /run/mirror3.out /run/mirror3.rc").stdout.split()
    assert out[0] == lazy_image.sha256(BIG) and out[-1] == "0", out
    stats = apulld_ping(node)["serving"]["stats"]
    # The rest came from the origin: the lab registry's log has apulld's reads after the stop.
    assert _served_to_apulld(origin_log) > 0
    print(f"{node.name}: cold read of {BIG}: {baseline:.1f} s through the mirror, "
          f"{seconds:.1f} s with the mirror stopped once 4 MiB were fetched (its shutdown took "
          f"{stopped_in:.1f} s): "
          f"{seconds - baseline:+.1f} s; {from_mirror_at_stop} bytes from the mirror before "
          f"the stop, {stats.get('bytes_fetched', 0)} fetched in all")  # fmt: skip


def test_a_mirror_taken_out_of_config_txt_leaves_the_node(lazy_node, tmp_path):
    result = deploy_with(lazy_node, tmp_path, "")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    hosts = run_on(lazy_node, f"cat {HOSTS_TOML}").stdout
    assert "[host." in hosts and MIRROR not in hosts, hosts
    assert "registry_mirrors = []" in run_on(lazy_node, "cat /etc/apull/config.toml").stdout
    assert run_on(lazy_node, "ls /etc/containerd/certs.d").stdout.split() == [
        layout.guest_registry()]  # fmt: skip


# -- prewarm ----------------------------------------------------------------------------------


def prewarm(image: str, limit: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """make prewarm, as an operator runs it: the run and its report's per-(node, image) list."""
    started = time.monotonic()
    vars_ = json.dumps({"prewarm_images": [image]})
    result = apull("run", "prewarm", "--no-lab", "-e", vars_, "--limit", limit, *extra)
    print(f"prewarm --limit {limit} {' '.join(extra)}: {time.monotonic() - started:.1f} s")
    report = json.loads((ROOT / ".apull/reports/prewarm-last.json").read_text())
    return result, {(p["host"], p["image"]): p for p in report["prewarm"]}


def test_prewarm_the_start_up_set_then_whole_with_a_node_cut_off(lab, lazy_node, lazy_image):
    """node1 starts the image cold (apulld records what it read); node2 and node3 get that
    start-up set, node3 with its registry route blocked; then node2 the whole image, a rerun
    that does nothing, and a container whose reads need no registry at all."""
    recorder = lazy_node
    warm, cut = [n for n in lab if n is not recorder][:2]
    run_lazily(recorder, lazy_image, "prewarm-record")
    for node in (warm, cut):
        forget_image(node, lazy_image.ref)
    assert run_on(cut, "ip route add prohibit 10.0.2.100/32").returncode == 0
    try:
        result, images = prewarm(lazy_image.ref, f"{warm.name},{cut.name}",
                                 "-e", f"prewarm_startup_from={recorder.name}",
                                 "-e", "prewarm_startup_only=true")  # fmt: skip
    finally:
        run_on(cut, "ip route del prohibit 10.0.2.100/32")
    out = result.stdout
    assert result.returncode != 0, out[-3000:]
    assert recap(out)[warm.name][3] == 0 and recap(out)[cut.name][3] == 1, out[-3000:]
    assert "APULL PREWARM" in out
    first = images[(warm.name, lazy_image.ref)]
    assert (first["state"], first["pulled"], first["lazy"]) == ("warm", True, True), first
    assert 0 < first["startup_cached"] == first["startup_bytes"] < first["bytes"], first
    assert first["cached"] < first["bytes"], first
    failed = images[(cut.name, lazy_image.ref)]
    assert failed["state"] == "failed" and failed["error"].startswith("pull: "), failed
    assert "registry.lab:5000" in failed["error"], failed
    assert re.search(rf"^{cut.name}\s.*FAILED at: prewarm : Pull and warm the images", out, re.M), (
        out[-3000:]
    )
    print(
        f"start-up set: {first['startup_bytes']} of {first['bytes']} bytes, "
        f"{first['fetched']} fetched in {first['seconds']} s"
    )

    result, images = prewarm(lazy_image.ref, warm.name)
    assert result.returncode == 0, result.stdout[-3000:]
    whole = images[(warm.name, lazy_image.ref)]
    assert (whole["state"], whole["pulled"]) == ("warm", False), whole
    assert whole["cached"] == whole["bytes"] == lazy_image.erofs_bytes, whole
    assert 0 < whole["fetched"] <= whole["bytes"] - first["cached"], whole
    print(f"whole: {whole['fetched']} more bytes in {whole['seconds']} s")

    result, images = prewarm(lazy_image.ref, warm.name)
    assert result.returncode == 0 and recap(result.stdout)[warm.name][1] == 0, result.stdout[-3000:]
    assert images[(warm.name, lazy_image.ref)]["fetched"] == 0

    check, images = prewarm(lazy_image.ref, f"{warm.name},{cut.name}", "--check")
    assert check.returncode == 0, check.stdout[-3000:]
    assert images[(cut.name, lazy_image.ref)]["state"] == "absent"
    assert images[(warm.name, lazy_image.ref)]["state"] == "present"
    assert recap(check.stdout)[warm.name][1] == 0 and recap(check.stdout)[cut.name][1] == 1

    # Every byte the container reads is in the kernel's cache files already: no fetch.
    before = fetched(warm)
    run = nodes.ssh(warm, f"{K8S_CTR} run --rm --snapshotter apull {lazy_image.ref} prewarmed "
                          f"sha256sum /{BIG} /{OTHER}", timeout=600)  # fmt: skip
    assert lazy_image.sha256(BIG) in run.stdout and lazy_image.sha256(OTHER) in run.stdout, run
    assert fetched(warm) == before


# -- node-to-node sharing -------------------------------------------------------------------


def first_output_and_read(node: layout.LabNode, image: LazyImage, name: str) -> tuple[float, float]:
    """A cold container: seconds to its first output (a small file), then to read and hash
    the big file (checked)."""
    pull = nodes.ssh(node, f"{CRI} pull --json {image.ref}", timeout=300)
    assert pull.returncode == 0, pull.stderr
    started = time.monotonic()
    run = run_on(
        node, f"{K8S_CTR} run --rm --snapshotter apull {image.ref} {name}-a cat /data/hello"
    )
    first = time.monotonic() - started
    assert run.stdout == image.files["data/hello"].decode(), run.stderr
    started = time.monotonic()
    big = nodes.ssh(node, f"{K8S_CTR} run --rm --snapshotter apull {image.ref} {name}-b "
                          f"sha256sum /{BIG}", timeout=600)  # fmt: skip
    assert lazy_image_sha(image) in big.stdout, big
    return first, time.monotonic() - started


def lazy_image_sha(image: LazyImage) -> str:
    return image.sha256(BIG)


def registry_bytes(node: layout.LabNode) -> int:
    """Chunk bytes this node's apulld got from the registry (not from its peers)."""
    stats = apulld_ping(node)["serving"]["stats"]
    return int(stats.get("bytes_fetched", 0)) - int(stats.get("bytes_from_peers", 0))


def test_three_nodes_one_after_another_the_registry_serves_about_one(lab, lazy_image):
    deploy = apull("run", "deploy", "--no-lab", "-e", "apull_peer_sharing=true")
    assert deploy.returncode == 0, deploy.stdout[-4000:]
    try:
        for node in lab:
            forget_image(node, lazy_image.ref)
        offset = access_log().stat().st_size
        rows = []
        for index, node in enumerate(lab):
            first, read = first_output_and_read(node, lazy_image, f"peer{index}")
            rows.append((node.name, first, read, registry_bytes(node)))
        served = _served_to_apulld(offset)
        for name, first, read, got in rows:
            print(
                f"{name}: first output {first:.2f} s, big file {read:.1f} s, "
                f"{got} bytes from the registry"
            )
        print(f"registry: {served} bytes to the nodes' apulld in all")
        one = rows[0][3]
        assert one > 40 << 20  # the first node read the big file from the registry
        assert all(got < one // 10 for _, _, _, got in rows[1:]), rows
        assert served < 1.2 * one, (served, one)
        # First output no worse for the later nodes (noise allowed).
        assert all(first <= 1.5 * rows[0][1] + 1.0 for _, first, _, _ in rows[1:]), rows
    finally:
        off = apull("run", "deploy", "--no-lab")
        assert off.returncode == 0, off.stdout[-4000:]


# -- apull status on the deployed fleet ---------------------------------------------------------

CLOSED_PORT = 2299  # nothing listens here: a node that is down


def status_json(*args: str) -> tuple[int, dict]:
    result = apull("status", "--json", *args, timeout=300)
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    return result.returncode, json.loads(result.stdout)


def by_name(document: dict) -> dict[str, dict]:
    return {node["name"]: node for node in document["nodes"]}


def test_status_shows_a_ready_fleet_and_how_much_of_the_image_is_fetched(lab, lazy_node):
    started = time.monotonic()
    rc, doc = status_json()
    print(f"apull status --json over {len(lab)} nodes: {time.monotonic() - started:.1f} s")
    assert rc == 0, doc["summary"]
    assert doc["schema"] == 1
    summary = {k: v for k, v in doc["summary"].items() if k != "seconds"}
    assert summary == {"nodes": 3, "ready": 3, "drifted": 0, "failing": 0, "unreachable": 0}
    lab_nodes = {n.name: n for n in lab}
    for name, node in by_name(doc).items():
        assert node["state"] == "ready", node
        assert {f["level"] for f in node["findings"]} <= {"warn"}, node["findings"]
        uname = run_on(lab_nodes[name], "uname -r; uname -m").stdout.split()
        assert [node["host"]["kernel"], node["host"]["arch"]] == uname
        assert [b["current"] for b in node["binaries"]] == [True, True], node["binaries"]
        assert node["backend"] == "fscache", name
        # The gate's parameters are booleans: the kernel shows them as Y (or 1).
        assert node["fs_ctl"] is None or set(node["fs_ctl"].values()) <= {"Y", "1"}, node["fs_ctl"]
        assert {u: s["active"] for u, s in node["services"].items()} == dict.fromkeys(
            ("apulld.service", "apull-snapshotter.service", "containerd.service"), "active"
        )
        assert node["containerd_plugin"] == "ok"
        assert node["containerd_config"] == {
            "patched": True,
            "edited": False,
            "recorded": True,
            "drifted_keys": [],
        }
    lazy = by_name(doc)[lazy_node.name]
    images = [i for i in lazy["images"] if "test/lazy" in i["image"]]
    assert len(images) == 1, lazy["images"]
    image = images[0]
    assert image["layers"] >= 1 and 0 < image["fetched"] <= image["bytes"], image
    assert image["fraction"] == round(image["fetched"] / image["bytes"], 4)
    # The kernel's cache files hold what was fetched: the cache's use covers the image's part.
    assert lazy["cache"]["bytes"] >= image["fetched"], lazy["cache"]
    # The registry-down test left apulld's errors of the last hour, naming the registry.
    assert any("registry.lab:5000" in line for line in lazy["errors"]), lazy["errors"]
    table = apull("status", timeout=300)
    assert table.returncode == 0, table.stdout[-3000:]
    for node in lab:
        assert re.search(rf"^│ {node.name}\s+│ ready ", table.stdout, re.M), table.stdout
    assert "images pulled through apull" in table.stdout
    assert re.search(r"^3 node\(s\): 3 ready, 0 drifted, 0 failing, 0 unreachable", table.stdout,
                     re.M), table.stdout  # fmt: skip


def test_status_names_another_build_and_a_config_edited_back_by_hand(lab):
    binary_node, config_node = lab[0], lab[1]
    # Another build of apulld in place (a new file renamed in: the running apulld keeps its
    # own); containerd's config.toml edited back to the original by hand (not restarted).
    swap = ("cp -p /usr/bin/apulld /root/apulld.keep && cp -p /usr/bin/apulld /usr/bin/.apulld.x "
            "&& echo >> /usr/bin/.apulld.x && mv /usr/bin/.apulld.x /usr/bin/apulld")  # fmt: skip
    assert run_on(binary_node, swap).returncode == 0
    edit = f"cp -p {CONFIG} /root/config.keep && cat {CONFIG}.apull-orig > {CONFIG}"
    assert run_on(config_node, edit).returncode == 0
    try:
        rc, doc = status_json()
        table = apull("status", timeout=300)
    finally:
        run_on(binary_node, "mv -f /root/apulld.keep /usr/bin/apulld")
        run_on(config_node, f"cat /root/config.keep > {CONFIG} && rm -f /root/config.keep")
    assert rc == 1
    nodes_ = by_name(doc)
    assert doc["summary"]["drifted"] == 2 and doc["summary"]["ready"] == 1, doc["summary"]
    drifted = nodes_[binary_node.name]
    assert drifted["state"] == "drifted"
    apulld = next(b for b in drifted["binaries"] if b["name"] == "apulld")
    assert apulld["current"] is False and apulld["installed"] != apulld["expected"]
    assert [f["what"] for f in drifted["findings"] if f["level"] == "drift"] == ["binary"]
    edited = nodes_[config_node.name]
    assert edited["state"] == "drifted"
    check = edited["containerd_config"]
    assert check["patched"] is False and check["edited"] is True
    assert "proxy_plugins.apull.type" in check["drifted_keys"], check
    assert table.returncode == 1
    assert re.search(rf"^{binary_node.name}: drift: binary: apulld is another build", table.stdout,
                     re.M), table.stdout  # fmt: skip
    assert re.search(rf"^{config_node.name}: drift: containerd: {CONFIG} is no longer patched",
                     table.stdout, re.M), table.stdout  # fmt: skip
    # Put back: ready again.
    rc, doc = status_json()
    assert rc == 0 and doc["summary"]["ready"] == 3, doc["summary"]


def test_status_names_a_node_that_is_down(lab, tmp_path):
    config = tmp_path / "config.txt"
    nodes_ = " ".join([f"127.0.0.1:{n.ssh_port}" for n in lab] + [f"127.0.0.1:{CLOSED_PORT}"])
    config.write_text(f"TARGET=servers\nSSH_USER=root\nSSH_KEY={layout.ssh_key_path()}\n"
                      f"KUBECONFIG_PATH=\nNODES={nodes_}\n")  # fmt: skip
    result = apull("--config", str(config), "status", "--json", timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    doc = json.loads(result.stdout)
    dead = by_name(doc)[f"127.0.0.1_{CLOSED_PORT}"]
    assert dead["state"] == "unreachable" and dead["host"] is None
    assert "refused" in dead["error"].lower() or "unable to connect" in dead["error"].lower(), dead
    assert doc["summary"]["unreachable"] == 1 and doc["summary"]["ready"] == len(lab)
    unknown = apull("--config", str(config), "status", "no-such-node", timeout=120)
    assert unknown.returncode == 2 and "no-such-node" in unknown.stderr


def test_clean_restores_containerd_config_byte_for_byte(lab):
    result = apull("run", "uninstall", "--no-lab")
    assert result.returncode == 0, result.stdout[-4000:]
    for node in lab:
        assert config_state(node) == pristine[node.name], node.name
        assert run_on(node, "systemctl is-active containerd").stdout.strip() == "active"
        assert "apull" not in run_on(node, "ctr plugins ls").stdout
        leftovers = run_on(
            node,
            "ls -d /usr/bin/apulld /usr/bin/apull-containerd-grpc /etc/apull /var/lib/apull "
            "/var/lib/containerd-apull /etc/systemd/system/apulld.service "
            "/etc/systemd/system/apull-snapshotter.service 2>/dev/null; "
            "grep containerd-apull /proc/mounts",
        ).stdout
        assert leftovers.strip() == "", f"{node.name}: {leftovers}"
        # containerd still runs images, with its own snapshotter
        assert run_on(node, f"ctr images pull --plain-http {IMAGE}").returncode == 0
        run = run_on(node, f"ctr run --rm {IMAGE} hi-overlayfs echo hi")
        assert run.stdout.strip() == "hi", run.stderr
