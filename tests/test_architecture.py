"""The package's structure, as docs/architecture.md promises it: small loops, features as layers, no cycles."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import sb3_ppo_ext
from sb3_ppo_ext import ClippedPPO

PACKAGE = Path(sb3_ppo_ext.__file__).parent
# words that name a feature: none may appear in the two loops (the extension points stand for them)
FEATURE_WORDS = re.compile(r"mask|lstm|recurren|ref_|reference|kl_coef|normaliz\w*_value|popart|adaptive|rpo", re.I)


def _source_lines(function: object) -> list[str]:
    lines, _ = inspect.getsourcelines(function)  # type: ignore[arg-type]
    return lines


def test_ppo_py_reads_like_the_seed() -> None:
    assert len((PACKAGE / "ppo.py").read_text().splitlines()) <= 450
    for loop in (ClippedPPO._collect_rollouts, ClippedPPO._train_epochs):
        lines = _source_lines(loop)
        assert len(lines) <= 60, f"{loop.__name__}: {len(lines)} lines"
        code = [line.split("#")[0] for line in lines]  # comments may explain; code may not branch on a feature
        named = [line.strip() for line in code if FEATURE_WORDS.search(line)]
        assert not named, f"{loop.__name__} names a feature: {named}"


def test_no_function_over_80_lines_except_constructors() -> None:
    """Code lines from the signature to the end; a docstring does not count (documentation is not length)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "__init__":
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1:
                    length -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
                if length > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({length} lines)")
    assert not long


def test_the_collective_layer_reads_no_private_attribute_of_the_model() -> None:
    source = (PACKAGE / "distributed.py").read_text()
    assert not re.findall(r"\bmodel\._\w+", source.replace("model._setup_learn(*args)", ""))
    assert not re.findall(r"getattr\(model, \"_", source)


def _package_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def _module_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports at module level (``TYPE_CHECKING`` blocks included).

    ``from package import module`` depends on the module; an import of one's own parent package is no edge
    (Python has initialised it before).
    """
    found = set()
    for node in ast.parse(path.read_text()).body:
        blocks = [*node.body, *node.orelse] if isinstance(node, ast.If) else [node]
        for block in blocks:
            if isinstance(block, ast.ImportFrom) and block.module:
                for alias in block.names:
                    child = f"{block.module}.{alias.name}"
                    found.add(child if child in modules else block.module)
            elif isinstance(block, ast.Import):
                found.update(alias.name for alias in block.names)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def test_no_import_cycle_in_the_package() -> None:
    modules = _package_modules()
    graph = {name: _module_imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*stack[stack.index(nxt) :], nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*stack, nxt]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, [node]):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("sb3_ppo_ext.reference", "sb3_ppo_ext.rlhf.reference"),
        ("sb3_ppo_ext.preferences", "sb3_ppo_ext.rlhf.preferences"),
        ("sb3_ppo_ext.recurrent_policies", "sb3_ppo_ext.recurrent.policies"),
        ("sb3_ppo_ext.checks", "sb3_ppo_ext.reliability.checks"),
        ("sb3_ppo_ext.checkpoints", "sb3_ppo_ext.reliability.checkpoints"),
        ("sb3_ppo_ext.envs", "sb3_ppo_ext.zoo.envs"),
        ("sb3_ppo_ext.presets", "sb3_ppo_ext.zoo.presets"),
        ("sb3_ppo_ext.normalizers", "sb3_ppo_ext.stabilizers.value_normalization"),
    ],
)
def test_old_module_paths_are_the_moved_modules(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_names_of_moved_classes_still_resolve() -> None:
    from sb3_ppo_ext.buffers import RecurrentGAERolloutBuffer
    from sb3_ppo_ext.optim import KLAdaptiveLearningRate
    from sb3_ppo_ext.recurrent.buffers import RecurrentGAERolloutBuffer as moved
    from sb3_ppo_ext.reliability import ReliabilityMixin
    from sb3_ppo_ext.stabilizers.adaptive_lr import KLAdaptiveLearningRate as moved_rule

    assert RecurrentGAERolloutBuffer is moved and KLAdaptiveLearningRate is moved_rule
    assert ReliabilityMixin in ClippedPPO.__mro__
