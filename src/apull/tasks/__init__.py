"""Fabric tasks: operations run straight over SSH, in parallel, without Ansible."""
