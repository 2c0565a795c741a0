"""containerd's side of the deployment: its config.toml, patched for the apull proxy snapshotter.

Runs on the controller (the `apull.deploy.containerd_config` action plugin imports it); the
nodes only receive the finished text.
"""

from apull.containerd.config_patch import (
    DEFAULT_GRPC_ADDRESS,
    DEFAULT_PROXY_ADDRESS,
    DEFAULT_SNAPSHOTTER,
    Change,
    ConfigPatchError,
    PatchResult,
    format_key_path,
    grpc_address,
    parse_key_path,
    patch_config,
)

__all__ = [
    "DEFAULT_GRPC_ADDRESS",
    "DEFAULT_PROXY_ADDRESS",
    "DEFAULT_SNAPSHOTTER",
    "Change",
    "ConfigPatchError",
    "PatchResult",
    "format_key_path",
    "grpc_address",
    "parse_key_path",
    "patch_config",
]
