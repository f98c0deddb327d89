"""A griffe extension: Sphinx cross-reference roles in docstrings become links of the site.

The package's docstrings use Sphinx's ``:class:`~sb3_ppo_ext.buffers.GAERolloutBuffer```, ``:func:`linear```, ...
mkdocstrings renders Markdown, so each role becomes an autorefs link (``[`GAERolloutBuffer`][sb3_ppo_ext.buffers.
GAERolloutBuffer]``) when it names a public object of the package. Such a link to an object the site does not
render (a renamed or removed one) makes ``mkdocs build --strict`` fail. Names outside the package (torch, SB3) and
private names stay code spans. A short name that resolves nowhere (a renamed class) is a warning, and so fails
the strict build, unless it is listed in ``KNOWN_UNRESOLVED``.

Two more things happen to docstrings on their way to the site (never to the code): ``ClippedPPO``'s parameter
table gets every constructor argument in the signature's order, SB3's with one sentence (``SB3_ARGUMENTS``), and
classes that document the arguments of an ``__init__`` inherited from outside the package are not checked
against a signature griffe cannot see.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|meth|func|mod|attr|data|exc|obj|const):`(~?)([^`]+?)`")
PACKAGE = "sb3_ppo_ext"
# classes whose docstring documents what they add to SB3's arguments: the site's parameter table lists every
# constructor argument, in the signature's order, those SB3 defines with this sentence
SB3_ARGUMENTS = {"sb3_ppo_ext.ppo.ClippedPPO": "As SB3's ``PPO``: same name, default and meaning."}
LITERAL_MARKER = re.compile(r"(\S)::\n\n(?=[ \t])")
FIELD = re.compile(r"^:(param|type|return|returns|rtype|raises?|var|ivar|cvar)\b")
# (docstring's object, role) pairs known to name nothing, to be fixed in their modules (then removed from here)
KNOWN_UNRESOLVED: set[tuple[str, str]] = set()
EXTERNAL_PREFIXES = ("th", "torch", "np", "numpy", "gym", "gymnasium", "spaces")
log = logging.getLogger("mkdocs.plugins.sphinx_roles")


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Once griffe has loaded the package: rewrite each docstring's roles, before anything renders them."""
        if pkg.path != PACKAGE:
            return
        self._collection = loader.modules_collection
        for obj in self._walk(pkg, set()):
            if obj.docstring is None:
                continue
            value = ROLE.sub(lambda match, obj=obj: self._link(obj, match), obj.docstring.value)
            # reST's "text::" before an indented block: the block is code in Markdown too; keep one colon
            obj.docstring.value = LITERAL_MARKER.sub(r"\1:\n\n", value)
            if obj.is_class and not self._has_own_init(obj):
                # a class that documents the arguments of an __init__ it inherits from outside the package (SB3's
                # CheckpointCallback, ...): griffe cannot see that signature, so it cannot check the names
                obj.docstring.parser_options = {**obj.docstring.parser_options, "warnings": False}

        for path, sentence in SB3_ARGUMENTS.items():
            self._complete_parameters(self._collection[path], sentence)

    def _complete_parameters(self, cls: griffe.Object, sentence: str) -> None:
        """Give every ``__init__`` argument of ``cls`` a ``:param:`` entry, in the signature's order."""
        lines = cls.docstring.value.splitlines()
        first = next(i for i, line in enumerate(lines) if FIELD.match(line))
        head, entries, tail, current = lines[:first], {}, [], None
        for line in lines[first:]:
            match = re.match(r"^:param (\w+):", line)
            if match:
                current = entries.setdefault(match.group(1), [])
                current.append(line)
            elif FIELD.match(line):
                current = tail
                tail.append(line)
            elif current is not None:
                current.append(line)
        names = [p.name for p in cls.members["__init__"].parameters if p.name not in ("self", "_init_setup_model")]
        ordered = [line for name in names for line in entries.get(name, [f":param {name}: {sentence}"])]
        cls.docstring.value = "\n".join(head + ordered + tail)

    def _has_own_init(self, cls: griffe.Object) -> bool:
        """Whether ``cls`` or a base class inside the package defines ``__init__`` (so griffe knows its signature)."""
        try:
            return any("__init__" in klass.members for klass in [cls, *cls.mro()] if klass.path.startswith(PACKAGE))
        except (griffe.AliasResolutionError, griffe.CyclicAliasError, ValueError):
            return False

    def _walk(self, obj: griffe.Object, seen: set[str]):
        if obj.path in seen:
            return
        seen.add(obj.path)
        yield obj
        for member in list(obj.members.values()):
            if not member.is_alias:
                yield from self._walk(member, seen)

    def _find(self, path: str) -> griffe.Object | None:
        try:
            found = self._collection[path]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        if found.is_alias:
            try:
                return found.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        return found

    def _resolve(self, obj: griffe.Object, name: str) -> griffe.Object | None:
        name = name.removesuffix("()")
        if name.startswith(PACKAGE + ".") or name == PACKAGE:
            return self._find(name)
        scope: griffe.Object | None = obj
        while scope is not None:
            found = self._find(f"{scope.path}.{name}")
            if found is not None:
                return found
            scope = scope.parent
        return self._find(f"{PACKAGE}.{name}")

    def _link(self, obj: griffe.Object, match: re.Match) -> str:
        tilde, name = match.group(2), match.group(3).strip()
        if "<" in name:  # Sphinx's "title <target>" form
            title, name = name.split("<", 1)
            display, name = title.strip(), name.rstrip(">").strip()
        else:
            display = name.rsplit(".", 1)[-1] if tilde else name
        target = self._resolve(obj, name)
        if target is None:
            if name.startswith(PACKAGE + "."):  # a qualified name of ours that is gone: a broken link, on purpose
                return f"[`{display}`][{name}]"
            if name.split(".")[0] not in EXTERNAL_PREFIXES and (obj.path, match.group(0)) not in KNOWN_UNRESOLVED:
                log.warning("%s: the docstring's %s names nothing in the package", obj.path, match.group(0))
            return f"`{display}`"
        if not target.path.startswith(PACKAGE) or _is_private(target.path):
            return f"`{display}`"
        return f"[`{display}`][{target.path}]"
