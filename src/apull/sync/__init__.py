"""Putting the node binaries on a node: the one logic behind both `fab sync-bin` and the
Ansible `apull` role (sha256 compare, temp upload + atomic rename, previous kept for rollback,
restart only what changed). Installers supply the transport; this package says what to run.
"""
