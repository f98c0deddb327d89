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
NOT_RUNNABLE_ELSEWHERE: dict[tuple[str, str], str] = {}
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
    # offline: the diagrams are drawn by the site's own Mermaid (docs/_hooks/mermaid.py), no page loads a remote script
    architecture = (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert '<script src="../javascripts/mermaid.min.js">' in architecture
    assert (site / "javascripts" / "mermaid.min.js").stat().st_size > 1_000_000
    for page in site.rglob("*.html"):
        assert not re.search(r'<script[^>]+src="(https?:)?//', page.read_text(encoding="utf-8")), page


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


# -- every public callable documents its parameters and what it returns ------------------------------------------
#
# The rule (Sphinx fields, which the API reference renders as tables): a public function or method (its name, its
# class's and its module's do not start with "_"; __init__ included, whose parameters the class docstring may
# document instead) has a ":param name:" for each parameter but self, cls, *args, **kwargs and "_"-names, and a
# ":return:" unless it returns None (a property, a setter and a context manager's Iterator[None] return nothing to
# document). Two things stand in for fields: a method implementing a hook of Extension whose docstring names that
# hook (":meth:`Extension.shape_rewards`": the hook documents its parameters and return value), and the
# constructor arguments that docs/_hooks/sphinx_roles.py's SB3_ARGUMENTS completes on the site (ClippedPPO's SB3
# ones). What is still missing in modules other engineers own is listed in DOCSTRING_FIELDS_TO_FILL.

DOCSTRING_FIELDS_TO_FILL = ROOT / "tests" / "data" / "docstring_fields_to_fill.txt"
PARAM_FIELD = re.compile(r"^\s*:(?:param|parameter|arg|argument|key|keyword)(?:\s+[^:]+?)?\s+\*{0,2}(\w+):", re.M)
RETURN_FIELD = re.compile(r"^\s*:returns?:", re.M)
NOTHING_RETURNED = {"None", "NoReturn", "Never", "Iterator[None]", "Generator[None, None, None]"}


def _public_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(part.startswith("_") and part not in ("__init__", "__main__") for part in parts):
            continue
        if parts[-1] == "__main__" and len(parts) > 2:  # python -m sb3_ppo_ext.zoo / .benchmark: wrappers
            continue
        modules.append((".".join(parts).removesuffix(".__init__"), path))
    return modules


def _hook_setting(name: str) -> object:
    """A constant of docs/_hooks/sphinx_roles.py, read without importing it (it needs the docs extra)."""
    tree = ast.parse((DOCS / "_hooks" / "sphinx_roles.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def _decorators(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for decorator in function.decorator_list:
        node = decorator.func if isinstance(decorator, ast.Call) else decorator
        names.add(node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", ""))
    return names


def _returns_something(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    if function.returns is not None:
        return ast.unparse(function.returns) not in NOTHING_RETURNED

    def own_nodes(node: ast.AST):  # the function's own statements, not those of nested functions and classes
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                yield child
                yield from own_nodes(child)

    return any(
        isinstance(node, (ast.Yield, ast.YieldFrom))
        or (isinstance(node, ast.Return) and node.value is not None and ast.unparse(node.value) != "None")
        for node in own_nodes(function)
    )


def _missing_docstring_fields() -> dict[str, list[str]]:
    """Qualified name -> the fields its docstring lacks, for every public callable of the package."""
    extension = ast.parse((PACKAGE / "extensions.py").read_text(encoding="utf-8"))
    base = next(n for n in extension.body if isinstance(n, ast.ClassDef) and n.name == "Extension")
    hooks = {n.name for n in base.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    completed_by_site = set(_hook_setting("SB3_ARGUMENTS"))
    missing: dict[str, list[str]] = {}

    def check(function, qualname: str, class_doc: str | None, completed: bool) -> None:
        decorators = _decorators(function)
        if decorators & {"overload", "setter", "deleter"}:
            return
        doc = ast.get_docstring(function) or ""
        if class_doc is not None and function.name in hooks:
            if re.search(rf":meth:`[^`]*\bExtension\.{function.name}>?`", doc):
                return
        if function.name == "__init__":
            doc += "\n" + (class_doc or "")
        arguments = function.args
        names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
        documented = set(PARAM_FIELD.findall(doc))
        fields = [
            f":param {name}:"
            for name in names
            if name not in ("self", "cls") and not name.startswith("_") and name not in documented
        ]
        if function.name == "__init__" and completed:
            fields = []
        is_property = bool(decorators & {"property", "cached_property"})
        if not is_property and function.name != "__init__" and _returns_something(function):
            if not RETURN_FIELD.search(doc):
                fields.append(":return:")
        if fields:
            missing[qualname] = fields

    def walk(body: list[ast.stmt], prefix: str, class_doc: str | None, completed: bool) -> None:
        for node in body:
            if isinstance(node, (ast.If, ast.Try)):
                walk(node.body + node.orelse + getattr(node, "finalbody", []), prefix, class_doc, completed)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith("_") or (node.name == "__init__" and class_doc is not None):
                    check(node, f"{prefix}.{node.name}", class_doc, completed)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                qualname = f"{prefix}.{node.name}"
                walk(node.body, qualname, ast.get_docstring(node) or "", qualname in completed_by_site)

    for module, path in _public_modules():
        walk(ast.parse(path.read_text(encoding="utf-8")).body, module, None, False)
    return missing


def _fields_to_fill() -> dict[str, list[str]]:
    entries = {}
    for line in DOCSTRING_FIELDS_TO_FILL.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, fields = line.partition(" ")
            entries[name] = re.findall(r":\w+(?: \w+)?:", fields)
    return entries


def test_every_public_callable_documents_its_parameters_and_return() -> None:
    missing, to_fill = _missing_docstring_fields(), _fields_to_fill()
    unlisted = {name: fields for name, fields in missing.items() if not set(fields) <= set(to_fill.get(name, ()))}
    assert not unlisted, "add :param:/:return: fields to these docstrings:\n" + "\n".join(
        f"  {name}: {' '.join(fields)}" for name, fields in sorted(unlisted.items())
    )
    done = sorted(set(to_fill) - set(missing))
    assert not done, f"these are documented now: remove them from {DOCSTRING_FIELDS_TO_FILL.name}: {done}"
