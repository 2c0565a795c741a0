"""Test doubles for the things apull-deploy talks to that cannot run on the test machine."""
