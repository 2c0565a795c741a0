"""The settings file: `version = 1` with TOML arrays, the unversioned format before it still
read, anything else refused with the file, the key and the fix named."""

from __future__ import annotations

from pathlib import Path

import pytest

from apull_node.service.settings import SettingsError, load_settings


def settings_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_version_1_lists_are_arrays(tmp_path: Path) -> None:
    path = settings_file(
        tmp_path,
        'version = 1\n[apulld]\nregistry_insecure = ["a:5000", "b"]\n'
        'registry_mirrors = ["http://m:4001", "docker.io=https://m.example"]\n',
    )
    apulld = load_settings(path).apulld
    assert apulld.registry_insecure == ("a:5000", "b")
    assert apulld.registry_mirrors == ("http://m:4001", "docker.io=https://m.example")


def test_an_unversioned_file_is_the_format_before_comma_strings(tmp_path: Path) -> None:
    path = settings_file(tmp_path, '[apulld]\nregistry_insecure = "a:5000, b"\n')
    assert load_settings(path).apulld.registry_insecure == ("a:5000", "b")


def test_a_missing_file_gives_the_defaults(tmp_path: Path) -> None:
    apulld = load_settings(tmp_path / "absent.toml").apulld
    assert apulld.registry_insecure == () and apulld.registry_mirrors == ()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("version = 2\n", "version: 2 is not a settings version this build reads (1, or none"),
        ('version = "1"\n', "version: '1' is not a settings version"),
        ("version = true\n", "version: True is not a settings version"),
        (
            'version = 1\n[apulld]\nregistry_insecure = "a:5000"\n',
            "[apulld] registry_insecure: expected an array of strings, got 'a:5000'",
        ),
        (
            "version = 1\n[apulld]\nregistry_mirrors = [1]\n",
            "[apulld] registry_mirrors: expected an array of strings, got [1]",
        ),
        ('version = 1\n[apulld]\nthread_num = "4"\n', "[apulld] thread_num: expected int"),
    ],
)
def test_a_bad_file_is_refused_naming_file_and_key(tmp_path: Path, text: str, said: str) -> None:
    path = settings_file(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: ")
    assert said in str(err.value)


def test_a_newer_version_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"rewrite the file with the apull role \(make all\)"):
        load_settings(settings_file(tmp_path, "version = 2\n"))
