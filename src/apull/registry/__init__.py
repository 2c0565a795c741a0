"""Talking to registries that speak the OCI distribution (registry v2) protocol."""
