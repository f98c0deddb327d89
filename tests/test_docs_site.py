"""The documentation site (mkdocs.yml, docs/): it builds with warnings as errors, its Python blocks run, it agrees
with the code (ClippedPPO's arguments, the package's modules), and README stays a short front page.

The strict build fails on a broken link or anchor, a cross-reference to a renamed or removed object and a
docstring the generator cannot read, so this file is what makes CI catch them. ``pip install -e ".[docs]"``
(part of ``.[tests]``) installs the generator.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "sb3_ppo_ext"

# ```python blocks of the pages that predate the site and are not self-contained; their owners may make them
# runnable or mark them <!-- no-run -->. Keyed by page and the block's first line; each entry must still exist.
NOT_RUNNABLE_ELSEWHERE = {
    ("docs/benchmark.md", "from stable_baselines3.common.env_util import make_vec_env"): "trains the Zoo's 100k steps",
    ("docs/reliability.md", "from sb3_ppo_ext import ClippedPPO"): "a fragment (env undefined), 1M steps",
    ("docs/export.md", "from sb3_ppo_ext.export import to_onnx, to_torchscript, read_metadata"): "a fragment",
    ("docs/export.md", "import numpy as np"): "a fragment (env undefined)",
}
NO_RUN = "<!-- no-run -->"


def _nav_pages() -> list[str]:
    """Every Markdown page of mkdocs.yml's navigation, relative to docs/."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def _python_blocks(page: str) -> list[tuple[int, str, bool]]:
    """(line, code, runnable) for each ```python block of a page (a path from the repository root); a block right
    after <!-- no-run --> is not runnable."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((start + 1, "\n".join(lines[start + 1 : end]), previous != NO_RUN))
            i = end
        i += 1
    return blocks


def _runnable(page: str, code: str) -> bool:
    first_line = code.splitlines()[0] if code else ""
    return (page, first_line) not in NOT_RUNNABLE_ELSEWHERE


# the site's pages and README, whose example is the site's first one
PAGES = ["README.md", *(f"docs/{page}" for page in _nav_pages())]
PAGES_WITH_CODE = [
    page for page in PAGES if any(runnable and _runnable(page, code) for _, code, runnable in _python_blocks(page))
]


def test_the_strict_build_succeeds(tmp_path: Path) -> None:
    """``mkdocs build --strict``: any warning (link, anchor, reference, docstring) fails it."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    site = tmp_path / "site"
    assert (site / "api" / "clipped_ppo" / "index.html").exists()
    assert (site / "benchmarks" / "results" / "mujoco_1m" / "curves_Hopper-v5.png").exists()
    assert "search_index.json" in {p.name for p in (site / "search").iterdir()}


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_the_python_blocks_of_a_page_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's blocks run in order in one namespace (a page reads as one session), in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_page_{Path(page).stem}"}
    for line, code, runnable in _python_blocks(page):
        if runnable and _runnable(page, code):
            exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102 - our own documentation


def test_the_list_of_blocks_that_do_not_run_is_current() -> None:
    blocks = {(page, code.splitlines()[0]) for page in PAGES for _, code, _ in _python_blocks(page) if code}
    assert set(NOT_RUNNABLE_ELSEWHERE) <= blocks
    marked = [(page, line) for page in PAGES for line, _, runnable in _python_blocks(page) if not runnable]
    assert len(marked) <= 5, f"keep the blocks marked {NO_RUN} few: {marked}"


def test_every_page_is_in_the_navigation() -> None:
    pages = (p.relative_to(DOCS) for p in DOCS.rglob("*.md"))
    on_disk = {page.as_posix() for page in pages if page.parts[0][0] not in "_."}  # not docs/_hooks/
    assert on_disk == set(_nav_pages())


def _api_targets() -> set[str]:
    return {m for page in (DOCS / "api").glob("*.md") for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)}


def test_the_api_reference_documents_every_public_module() -> None:
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") and part != "__main__" for part in parts[1:]):
            continue
        if parts[-1] == "__main__" and len(parts) > 2:  # python -m sb3_ppo_ext.zoo / .benchmark: wrappers
            continue
        modules.add(".".join(parts))
    # sb3_ppo_ext's and sb3_ppo_ext.ppo's public names are documented as sb3_ppo_ext.ClippedPPO and the policies
    modules -= {"sb3_ppo_ext", "sb3_ppo_ext.ppo"}
    assert modules <= _api_targets(), sorted(modules - _api_targets())
    assert "sb3_ppo_ext.ClippedPPO" in _api_targets()


def test_the_switching_table_lists_every_constructor_argument_with_its_default() -> None:
    """docs/switching/sb3-ppo.md's table: ClippedPPO's arguments in order, with their defaults and SB3's."""
    from stable_baselines3 import PPO

    from sb3_ppo_ext import ClippedPPO

    rows = re.findall(
        r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", (DOCS / "switching" / "sb3-ppo.md").read_text(), flags=re.M
    )
    ours = [p for p in inspect.signature(ClippedPPO.__init__).parameters.values() if p.name != "self"]
    sb3 = inspect.signature(PPO.__init__).parameters
    assert [name for name, _, _ in rows] == [p.name for p in ours]

    def default(cell: str) -> object:
        cell = cell.strip()
        return inspect.Parameter.empty if cell == "required" else ast.literal_eval(cell.strip("`"))

    for (name, ours_cell, sb3_cell), parameter in zip(rows, ours, strict=True):
        assert default(ours_cell) == parameter.default, name
        if name in sb3:
            assert default(sb3_cell) == sb3[name].default, name
        else:
            assert sb3_cell.strip() == "—", name


def test_readme_is_a_short_front_page_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_readme_two_commands_are_what_ci_runs() -> None:
    """README's "Two commands" section and .ci/run install and test the same way."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Two commands") : readme.index("\n## ", readme.index("## Two commands") + 1)]
    commands = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert commands[1] == 'pip install torch==2.13.0 && pip install -e ".[tests]" && python -m pytest -n 2 tests'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for step in commands[1].split(" && "):
        assert f"\n{step}" in ci or step in ci, step
    assert (DOCS / "getting-started.md").read_text(encoding="utf-8").count(commands[0]) == 1
