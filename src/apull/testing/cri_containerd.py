"""A private containerd with its CRI plugin on, configured the way the containerd role does it
(tests only).

The config is HostContainerd's (own root, state and sockets) put through
apull.containerd.config_patch, the code that patches the nodes' config.toml, so a test of a
CRI pull also tests what the role writes: the proxy snapshotter, CRI's snapshotter, and the
insecure registries' hosts.toml files (apull.containerd.registry_hosts, in the instance's own
certs.d, which config_path names). CRI's own directories live under the instance's root and state
(containerd derives them); CNI's configuration and plugin directories are pointed into the
work directory, so the instance neither reads nor creates the host's /etc/cni/net.d. Without a
CNI config CRI serves images and reports its network as not ready: pods are not this
instance's business.

    with CriContainerd(workdir, snapshotter_address, ["192.0.2.2:5000"]) as ctd:
        pull_image(ctd.address, "192.0.2.2:5000/lab/busybox:latest")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from apull.containerd.config_patch import patch_config
from apull.containerd.registry_hosts import hosts_files
from apull.testing.host_containerd import DISABLED_PLUGINS, HostContainerd

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
#: CRI's images live in this containerd namespace.
CRI_NAMESPACE = "k8s.io"


class CriContainerd(HostContainerd):
    disabled_plugins = tuple(p for p in DISABLED_PLUGINS if p != CRI_PLUGIN)

    def __init__(
        self,
        workdir: Path,
        snapshotter_address: str,
        insecure_registries: Sequence[str] = (),
        snapshotter_name: str = "apull",
        cri_snapshotter: bool = True,
        registry_mirrors: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, snapshotter_address, snapshotter_name)
        self.insecure_registries = tuple(insecure_registries)
        self.registry_mirrors = tuple(registry_mirrors)
        self.cri_snapshotter = cri_snapshotter

    @property
    def hosts_dir(self) -> Path:
        return self.workdir / "certs.d"

    def config_text(self) -> str:
        cni = f'plugins."{CRI_PLUGIN}".cni'
        files = hosts_files(self.insecure_registries, self.registry_mirrors)
        for name, text in files.items():
            (self.hosts_dir / name).mkdir(parents=True, exist_ok=True)
            (self.hosts_dir / name / "hosts.toml").write_text(text)
        return patch_config(
            super().config_text(),
            proxy_address=self.snapshotter_address,
            snapshotter_name=self.snapshotter_name,
            set_default_snapshotter=self.cri_snapshotter,
            registry_hosts=list(files),
            hosts_dir=str(self.hosts_dir),
            overrides={
                f"{cni}.conf_dir": str(self.workdir / "cni" / "net.d"),
                f"{cni}.bin_dir": str(self.workdir / "cni" / "bin"),
            },
            source=str(self.config),
        ).text
