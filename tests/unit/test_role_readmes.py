"""Every role's README has the same layout: the title, then What it does, Entry points,
Variables, Example (optional) and Test; its Variables table lists exactly the variables of
defaults/main.yml, Entry points names each entry point of meta/argument_specs.yml, and Test
names each of the role's molecule scenarios."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())

SECTIONS = ["What it does", "Entry points", "Variables", "Example", "Test"]
OPTIONAL = {"Example"}


def readme(role: str) -> str:
    return (ROOT / "roles" / role / "README.md").read_text()


def sections(text: str) -> dict[str, list[str]]:
    """`## ` heading -> its lines, in order; lines in code fences are never headings."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            heading = line[3:].strip()
            assert heading not in found, f"heading {heading!r} twice"
            current = found[heading] = []
        elif current is not None:
            current.append(line)
    return found


def table_names(lines: list[str]) -> list[str]:
    """The first backticked name of each row of the section's tables (header and rule
    rows skipped)."""
    names = []
    for line in lines:
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]*", line.strip()):
            continue
        first = line.strip("|").split("|")[0]
        if m := re.search(r"`([^`]+)`", first):
            names.append(m.group(1))
        else:
            assert first.strip() == "variable", f"a row without a backticked name: {line}"
    return names


def scenarios(role: str) -> list[str]:
    base = ROOT / "roles" / role / "molecule"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "molecule.yml").exists())


def entry_points(role: str) -> list[str]:
    text = (ROOT / "roles" / role / "meta/argument_specs.yml").read_text()
    return sorted(yaml.safe_load(text)["argument_specs"])


def test_every_role_is_checked() -> None:
    assert len(ROLES) >= 8 and "apull" in ROLES and "containerd" in ROLES


@pytest.mark.parametrize("role", ROLES)
def test_title(role: str) -> None:
    first = readme(role).splitlines()[0]
    assert re.fullmatch(rf"# Role `{re.escape(role)}`( \(.+\))?", first), first


@pytest.mark.parametrize("role", ROLES)
def test_sections_in_order(role: str) -> None:
    headings = list(sections(readme(role)))
    expected = [s for s in SECTIONS if s not in OPTIONAL or s in headings]
    assert headings == expected


@pytest.mark.parametrize("role", ROLES)
def test_variables_table_lists_the_defaults(role: str) -> None:
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults/main.yml").read_text()) or {}
    names = table_names(sections(readme(role)).get("Variables", []))
    assert len(names) == len(set(names)), "a variable listed twice"
    assert sorted(names) == sorted(defaults)


@pytest.mark.parametrize("role", ROLES)
def test_entry_points_are_named(role: str) -> None:
    text = "\n".join(sections(readme(role)).get("Entry points", []))
    for entry in entry_points(role):
        named = "`main`" if entry == "main" else f"`tasks_from: {entry}`"
        assert named in text, f"entry point {entry} not named"


@pytest.mark.parametrize("role", ROLES)
def test_test_section_names_each_scenario(role: str) -> None:
    assert scenarios(role), "no molecule scenario"
    text = "\n".join(sections(readme(role)).get("Test", []))
    for name in scenarios(role):
        assert f"`{name}`" in text or f"molecule/{name}" in text, f"scenario {name} not named"
