"""docs/architecture.md and README's "Where things live" list exactly the package's modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sb3_ppo_ext"


def _code_block_after(text: str, heading: str) -> str:
    """The first ``` block after ``heading``."""
    start = text.index(heading)
    block = re.search(r"```\n(.*?)```", text[start:], flags=re.DOTALL)
    assert block is not None, f"no code block after {heading!r}"
    return block.group(1)


def _package_entries() -> set[str]:
    """Top-level modules and folders of the package, and the modules of its subpackages as folder/name."""
    entries = set()
    for path in PACKAGE.iterdir():
        if (
            path.suffix == ".py"
            and path.name != "__init__.py"
            and not path.name.startswith("_")
            or path.name == "__main__.py"
        ):
            entries.add(path.name)
        elif path.is_dir() and not path.name.startswith(("_", ".")) and not path.name.endswith(".egg-info"):
            entries.add(path.name + "/")
    return entries


def _listed_entries(block: str) -> set[str]:
    """``name.py`` and ``folder/`` tokens that start a line of a layout block (the first column)."""
    listed = set()
    for line in block.splitlines():
        match = re.match(r"\s*([\w.]+/?)\s", line + " ")
        if match and (match.group(1).endswith(".py") or match.group(1).endswith("/")):
            listed.add(match.group(1))
    return listed - {"sb3_ppo_ext/"}


@pytest.mark.parametrize(
    ("document", "heading"),
    [("docs/architecture.md", "## Modules"), ("README.md", "## Where things live")],
)
def test_layout_lists_every_module_and_nothing_else(document: str, heading: str) -> None:
    block = _code_block_after((ROOT / document).read_text(encoding="utf-8"), heading)
    package_part = block.split("\nbenchmarks/")[0]  # README's block goes on with the repository's other folders
    assert _listed_entries(package_part) == _package_entries()


@pytest.mark.parametrize("folder", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()))
def test_architecture_names_every_module_of_each_subpackage(folder: str) -> None:
    block = _code_block_after((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"), "## Modules")
    # the folder's line and its continuation lines (indented deeper than the module column)
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(folder + "/"))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 20):
            break
        entry.append(line)
    text = "\n".join(entry)
    for path in (PACKAGE / folder).glob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            assert path.name in text, f"{folder}/{path.name} is not on its folder's line in docs/architecture.md"


def test_architecture_names_functions_that_exist() -> None:
    """Every ``module.function`` the data-flow section names is a real attribute of that module."""
    import importlib

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## One training iteration") : text.index("## Where to add things")]
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    found = 0
    for module_name, attribute in re.findall(r"\b([a-z_]+)\.([A-Za-z_]+)\b", section):
        if module_name in modules and attribute != "py":
            module = importlib.import_module(f"sb3_ppo_ext.{module_name}")
            assert hasattr(module, attribute), f"{module_name}.{attribute}"
            found += 1
    assert found >= 5
