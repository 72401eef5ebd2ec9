# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The package's shape, read from its source: no import cycle of any kind, no function over 60
lines or 8 parameters, library code that leaves the command line to cli.py, and a family list
where every family has a tiny test model and a model_type of its own."""

from __future__ import annotations

import ast
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import tiny_mixtral_config
from mergekit_moe2dense.families import FAMILIES, TEXT_PARTS, get_family
from tiny_families import COMMON, FAMILY_SPECS, MULTIMODAL_SPECS

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_moe2dense"
MAX_LINES = 60
MAX_PARAMETERS = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _where(path: Path, line: int | None = None) -> str:
    where = str(path.relative_to(PACKAGE.parent))
    return where if line is None else f"{where}:{line}"


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# -- imports: the graph of every import statement, lazy and typing-only ones included --


@dataclass(frozen=True)
class _Import:
    """One edge of the import graph: the line of the first statement importing `target`, and where it sits."""

    target: str
    line: int
    place: str  # "module level", "in a function" or "under TYPE_CHECKING"


def _import_statements(tree: ast.Module):
    """(statement, place) for every import in `tree`: a lazy import inside a function runs when the
    function does, and one under TYPE_CHECKING is read by type checkers and documentation tools:
    a cycle through either is still a cycle."""

    def visit(node, place):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, place
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(child, "under TYPE_CHECKING")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, "in a function" if place == "module level" else place)
            else:
                yield from visit(child, place)

    yield from visit(tree, "module level")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from ... import` reads, relative imports resolved."""
    if not node.level:
        return node.module
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, is_package: bool, node, modules) -> set[str]:
    """The package modules the statement `node` in `module` runs. Importing `a.b.c` runs `a` and
    `a.b` (their `__init__`) first; the packages holding `module` itself already run before it, so
    they count only where it takes a name their `__init__` defines."""
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1 + is_package)}
    if isinstance(node, ast.Import):
        dotted, names = [alias.name for alias in node.names], []
    else:
        dotted, names = [_absolute(module, is_package, node)], [alias.name for alias in node.names]
    found = set()
    for name in dotted:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    found -= own_packages
    for name in names:
        submodule = f"{dotted[0]}.{name}"
        # `from a.b import c`: the module a.b.c where there is one, else a name a.b's `__init__` defines
        found.add(submodule if submodule in modules else dotted[0])
    return {target for target in found if target in modules and target != module}


def import_graph() -> tuple[dict[str, Path], dict[str, dict[str, _Import]]]:
    """Every module of the package -> the package modules it imports -> the first statement doing so."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = {}
        for node, place in _import_statements(_parse(path)):
            for target in sorted(_targets(module, is_package, node, modules)):
                edges.setdefault(target, _Import(target, node.lineno, place))
        graph[module] = edges
    return modules, graph


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's components of `graph`, each sorted; iterative, so a long chain cannot overflow."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _shortest_path(graph, start: str, goal: str, within: set[str]) -> list[str]:
    previous, queue = {start: None}, deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for nxt in sorted(graph[node]):
            if nxt in within and nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{goal} is not reachable from {start} inside its component")


def _component_cycles(graph, component: list[str]) -> list[list[str]]:
    """Cycles inside one strongly connected component that together use each of its import
    edges: for each edge u -> v, the shortest way from v back to u. Breaking all of them (by
    moving code, or an import) leaves the component without a cycle."""
    members, cycles = set(component), set()
    for source in component:
        for target in sorted(set(graph[source]) & members):
            cycle = [source] + _shortest_path(graph, target, source, members)[:-1]
            first = cycle.index(min(cycle))
            cycles.add(tuple(cycle[first:] + cycle[:first]))
    return [list(cycle) for cycle in sorted(cycles, key=lambda cycle: (len(cycle), cycle))]


def import_cycles(graph) -> list[list[str]]:
    """Every cycle `_component_cycles` names, all components together."""
    return [cycle for component in _strongly_connected(graph) for cycle in _component_cycles(graph, component)]


def _hop(modules, graph, source: str, target: str) -> str:
    edge = graph[source][target]
    place = "" if edge.place == "module level" else f" ({edge.place})"
    return f"{modules[source].relative_to(PACKAGE)}:{edge.line}{place}"


def _describe(cycle, modules, graph) -> str:
    """`a.py:3 -> b/__init__.py:9 (in a function) -> a.py`: each module and its line importing the next."""
    hops = [_hop(modules, graph, source, target) for source, target in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
    return " -> ".join(hops + [str(modules[cycle[0]].relative_to(PACKAGE))])


def cycle_report(modules, graph) -> list[str]:
    """The cycles, grouped by the modules they tie together, each group headed by the import
    most of its cycles go through (often the one to move)."""
    lines = []
    for component in _strongly_connected(graph):
        cycles = _component_cycles(graph, component)
        if not cycles:
            continue
        edges = Counter(edge for cycle in cycles for edge in zip(cycle, cycle[1:] + cycle[:1], strict=True))
        (source, target), count = edges.most_common(1)[0]
        lines.append(
            f"{len(cycles)} cycles among {len(component)} modules, {count} of them through "
            f"{_hop(modules, graph, source, target)} -> {modules[target].relative_to(PACKAGE)}:"
        )
        lines += [f"  {_describe(cycle, modules, graph)}" for cycle in cycles]
    return lines


def test_no_import_cycle():
    modules, graph = import_graph()
    if import_cycles(graph):
        pytest.fail("import cycles:\n" + "\n".join(cycle_report(modules, graph)))


def test_import_graph_sees_every_kind_of_import():
    """The graph reads lazy, typing-only and relative imports, and the packages an import runs."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import mergekit_moe2dense.calibration.engine\n"
        "from . import kernel\n"
        "from mergekit_moe2dense.families import MoEFamily\n"
        "if TYPE_CHECKING:\n"
        "    from ..config import Moe2DenseConfig\n"
        "def later():\n"
        "    from mergekit_moe2dense.methods.base import MethodPlan\n"
    )
    modules = _modules()
    found = {
        target: place
        for node, place in _import_statements(tree)
        for target in _targets("mergekit_moe2dense.methods.concat", False, node, modules)
    }
    assert found == {
        "mergekit_moe2dense.calibration": "module level",
        "mergekit_moe2dense.calibration.engine": "module level",
        "mergekit_moe2dense.methods.kernel": "module level",
        "mergekit_moe2dense.families": "module level",
        "mergekit_moe2dense.config": "under TYPE_CHECKING",
        "mergekit_moe2dense.methods.base": "in a function",
    }
    # a cycle found through a lazy import, named edge by edge
    graph = {"a": {"b": _Import("b", 1, "module level")}, "b": {"a": _Import("a", 9, "in a function")}, "c": {}}
    assert import_cycles(graph) == [["a", "b"]]


# -- functions: at most 60 lines and 8 parameters --


def _functions(tree: ast.Module):
    """(function, whether it is a method) for every function of `tree`, nested ones included."""
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child, isinstance(node, ast.ClassDef)


def parameter_count(function, is_method: bool) -> int:
    """Parameters as a caller sees them: self/cls left out, *args and **kwargs one each."""
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    if is_method and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    starred = [arguments.vararg, arguments.kwarg]
    return len(positional) + len(arguments.kwonlyargs) + sum(a is not None for a in starred)


def long_functions() -> list[str]:
    """Functions over the limits, as file:line and what is over. The whole package counts: the
    click commands too, whose flags can arrive as one settings object (as `merge`'s do)."""
    found = []
    for path in _modules().values():
        for function, is_method in _functions(_parse(path)):
            lines = function.end_lineno - function.lineno + 1  # from `def` to the last line, decorators not counted
            parameters = parameter_count(function, is_method)
            over = []
            if lines > MAX_LINES:
                over.append(f"{lines} lines")
            if parameters > MAX_PARAMETERS:
                over.append(f"{parameters} parameters")
            if over:
                found.append(f"{_where(path, function.lineno)} {function.name}: {', '.join(over)}")
    return found


def test_no_function_over_60_lines_or_8_parameters():
    offenders = long_functions()
    if offenders:
        pytest.fail(
            f"{len(offenders)} functions over {MAX_LINES} lines or {MAX_PARAMETERS} parameters "
            "(split them; pass a settings object for a long parameter list):\n" + "\n".join(offenders)
        )


def test_parameter_count_leaves_out_self_and_counts_star_arguments_once():
    tree = ast.parse("class A:\n    def f(self, a, /, b, *args, c, **kwargs): ...\ndef g(self, a): ...\n")
    assert {f.name: parameter_count(f, is_method) for f, is_method in _functions(tree)} == {"f": 5, "g": 2}


# -- library code: errors are raised, and only the command line prints them and exits --


def _is_cli(path: Path) -> bool:
    """cli.py (cli_*.py, a cli/ package) and `python -m`'s __main__.py: the command line."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] == "cli" or relative.name.startswith("cli_") or relative.name in ("cli.py", "__main__.py")


def _exits(node) -> bool:
    """sys.exit(), os._exit(), exit(), quit(), or raise SystemExit."""
    if isinstance(node, ast.Raise) and node.exc is not None:
        raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return ast.unparse(raised) in ("SystemExit", "builtins.SystemExit")
    if isinstance(node, ast.Call):
        return ast.unparse(node.func) in ("sys.exit", "os._exit", "exit", "quit")
    if isinstance(node, ast.ImportFrom):
        return node.module in ("sys", "os") and any(alias.name in ("exit", "_exit") for alias in node.names)
    return False


def _imports_click(node) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "click" for alias in node.names)
    return isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == "click"


def command_line_in_library() -> list[str]:
    """Places outside the command line that import click or end the process."""
    found = []
    for path in _modules().values():
        if _is_cli(path):
            continue
        for node in ast.walk(_parse(path)):
            if _imports_click(node):
                found.append(f"{_where(path, node.lineno)} imports click")
            elif _exits(node):
                found.append(f"{_where(path, node.lineno)} exits the process: {ast.unparse(node)}")
    return found


def test_library_code_never_imports_click_or_exits():
    """The library raises Moe2DenseError subclasses; cli.py turns them into a message and an
    exit status. mergekit_plugin.py counts as library: it runs inside mergekit's own process."""
    offenders = command_line_in_library()
    if offenders:
        pytest.fail("library code doing the command line's work:\n" + "\n".join(offenders))


def test_library_check_sees_each_way_to_exit_and_tells_the_command_line_apart():
    cli = sorted(str(path.relative_to(PACKAGE)) for path in _modules().values() if _is_cli(path))
    assert cli[0] == "__main__.py" and "cli.py" in cli and "clustering.py" not in cli
    tree = ast.parse(
        "import click\nfrom click.testing import CliRunner\nfrom sys import exit\n"
        "sys.exit(1)\nos._exit(1)\nquit()\nraise SystemExit(2)\nraise SystemExit\n"
        "raise ValueError\nprint()\n"
    )
    assert sorted(node.lineno for node in ast.walk(tree) if _imports_click(node) or _exits(node)) == list(range(1, 9))


# -- the family list: a tiny test model each, one family per model_type --


def _tiny_configs() -> dict:
    """Family name -> the config of its tiny test model."""
    configs = {"mixtral": tiny_mixtral_config(vocab_size=64)}  # helpers.make_mixtral
    for name, (config_class, _, values) in FAMILY_SPECS.items():  # tiny_families.make_family_moe
        configs[name] = config_class(vocab_size=64, **{**COMMON, **values})
    return configs


def test_every_family_has_a_tiny_model_and_its_own_model_types():
    names = [family.name for family in FAMILIES]
    assert len(set(names)) == len(names), f"family names used twice: {sorted(n for n in names if names.count(n) > 1)}"
    tiny = _tiny_configs()
    untested = [name for name in names if name not in tiny]
    assert not untested, f"families without a tiny model in tests/tiny_families.py: {untested}"
    assert sorted(tiny) == sorted(names), "tiny models of families that are not in FAMILIES"
    claims = [(model_type, family.name) for family in FAMILIES for model_type in family.model_types]
    types = [model_type for model_type, _ in claims]
    shared = sorted({(t, n) for t, n in claims if types.count(t) > 1})
    assert not shared, f"model_types claimed by several families: {shared}"
    for family in FAMILIES:  # each tiny model is of its family, and detected as it
        assert tiny[family.name].model_type in family.model_types
        assert get_family(tiny[family.name]) is family
    multimodal = sorted(model_type for model_type, part in TEXT_PARTS.items() if part.multimodal)
    assert multimodal == sorted(MULTIMODAL_SPECS), "multimodal checkpoints without a tiny model in MULTIMODAL_SPECS"
