"""MkDocs hooks: the site shows the committed benchmark results (plots and summaries) of benchmarks/results/.

The pages keep links that work on GitHub (``../benchmarks/results/...`` from ``docs/``). The site gets the same
files under ``benchmarks/results/`` (nothing is copied into ``docs/``), an index page of that folder, and the
links are rewritten to them. A link written relative to the repository root (as README's are) is rewritten the
same way when it does not resolve inside ``docs/``. Anything else that does not resolve is left to MkDocs, whose
link validation fails the strict build.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
SUFFIXES = (".png", ".svg", ".md", ".txt", ".json", ".csv")
LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")


def _results_index(root: Path) -> str:
    """A page that lists every result folder with its summaries and plots."""
    lines = [
        "# Committed benchmark results",
        "",
        "Every file of the repository's `benchmarks/results/`, by folder (the summaries are pages of this site;"
        " method and commands: [Benchmarks](../../benchmark.md), plots: [Results](../../results.md)).",
        "",
    ]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        shown = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if shown:
            links = ", ".join(f"[{p.relative_to(folder).as_posix()}]({p.relative_to(root).as_posix()})" for p in shown)
            lines.append(f"* **{folder.name}/**: {links}")
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if loose:
        lines.append("* top level: " + ", ".join(f"[{p.name}]({p.name})" for p in loose))
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    """Add every file under benchmarks/results/ to the site, as if it sat in docs/benchmarks/results/."""
    root = ROOT / RESULTS
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES:
            # a summary .md becomes a page of its own (outside the navigation); the rest is copied as it is
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    files.append(File.generated(config, f"{RESULTS}/index.md", content=_results_index(root)))
    return files


def _site_path(in_repo: str, files: Files) -> str | None:
    """The site path (relative to docs/) of a repository path, when the site has it."""
    if in_repo.startswith("docs/"):
        candidate = in_repo[len("docs/") :]
    elif in_repo == RESULTS or in_repo.startswith(RESULTS + "/"):
        candidate = in_repo
    else:
        return None
    if files.get_file_from_path(candidate) is not None:
        return candidate
    index = posixpath.join(candidate, "index.md")
    return index if files.get_file_from_path(index) is not None else None


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """Point links that leave docs/ (or that are written from the repository root) at the site's copies."""
    if page.file.src_uri.startswith(RESULTS + "/"):  # the raw summaries: reached by links, kept out of the search
        page.meta.setdefault("search", {})["exclude"] = True
    page_dir = posixpath.dirname(page.file.src_uri)  # relative to docs/

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        here = posixpath.normpath(posixpath.join(page_dir, target))
        if not here.startswith("..") and files.get_file_from_path(here) is not None:
            return match.group(0)  # an ordinary link between pages
        for in_repo in (posixpath.normpath(posixpath.join("docs", page_dir, target)), posixpath.normpath(target)):
            site_path = _site_path(in_repo, files)
            if site_path is not None:
                return match.group(1) + posixpath.relpath(site_path, page_dir or ".") + match.group(3)
        return match.group(0)

    return LINK.sub(rewrite, markdown)
