# Copyright: apull-deploy contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
from __future__ import annotations

import os
import sys
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

DOCUMENTATION = """
    name: config_secret
    author: apull-deploy contributors
    version_added: "0.1.0"
    short_description: Read a secret from apull's config.txt
    description:
      - Returns the value of a secret key (such as C(SSH_PASSWORD)) of the operator's
        config.txt, so that the inventory can refer to the secret instead of holding it.
      - The config file is E(APULL_CONFIG) if set, else C(config.txt) in the repository this
        collection lives in (found by walking up from this plugin to the directory that holds
        C(config.txt) or C(inventory/apull_inventory.py)).
      - The file is read and checked with C(apull.config) from the repository's C(src/).
    options:
      _terms:
        description: Names of secret keys, for example C(SSH_PASSWORD).
        type: list
        elements: str
        required: true
    notes:
      - Fails if the config file has errors, if a term is not a secret key, or if the key is
        not set.
"""

EXAMPLES = """
- name: Connect with the password from config.txt
  ansible.builtin.set_fact:
    ansible_password: "{{ lookup('apull.deploy.config_secret', 'SSH_PASSWORD') }}"
  no_log: true
"""

RETURN = """
  _raw:
    description: The values of the requested secret keys, in the order asked.
    type: list
    elements: str
"""


def _find_repo() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "config.txt").is_file() or (parent / "inventory/apull_inventory.py").is_file():
            return parent
    return None


def _config_path(repo: Path | None) -> Path:
    env = os.environ.get("APULL_CONFIG")
    if env:
        return Path(env)
    if repo is None:
        raise AnsibleError(
            f"config_secret: cannot find the apull repository above {__file__}; set APULL_CONFIG"
        )
    return repo / "config.txt"


class LookupModule(LookupBase):
    def run(self, terms: list[str], variables: dict | None = None, **kwargs: object) -> list[str]:
        self.set_options(var_options=variables, direct=kwargs)
        repo = _find_repo()
        if repo is not None and str(repo / "src") not in sys.path:
            sys.path.insert(0, str(repo / "src"))
        try:
            from apull.config import SECRET_KEYS, ConfigError, format_problems, load_config
        except ImportError as e:
            raise AnsibleError(f"config_secret: cannot import apull.config: {e}") from e

        path = _config_path(repo)
        try:
            cfg = load_config(path)
        except ConfigError as e:
            raise AnsibleError(f"config_secret: {format_problems(e)}") from e

        values = []
        for term in terms:
            if term not in SECRET_KEYS:
                known = ", ".join(SECRET_KEYS)
                raise AnsibleError(f"config_secret: {term!r} is not a secret key ({known})")
            secret = cfg.secret(term)
            if secret is None:
                raise AnsibleError(f"config_secret: {term} is not set in {path}")
            values.append(secret.reveal())
        return values
