"""Module text for code that an export carries, taken from the project's own source.

An exported pipeline or reward model must load where perfusion_ray is not installed, so it carries the
code that runs it. That code is not a second implementation: `carried_module` copies the definitions
the project itself runs (classes, functions, constants, named by module and name) into one module text,
with exactly the imports those definitions use, so the export computes what the project computes. It
fails when a definition needs a project name that is not carried with it, or when the text would
import perfusion_ray, so a change that breaks an export's independence fails at export, not at a
user's load.
"""

from __future__ import annotations

import ast
import builtins
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

PROJECT = "perfusion_ray"


@dataclass(frozen=True)
class Definition:
    """A top-level definition of `module` to carry; `without` names methods of a class to leave out (those
    that need the project, or make sense only inside it)."""

    module: ModuleType
    name: str
    without: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Source:
    lines: list[str]
    tree: ast.Module
    defined: dict[str, ast.stmt]  # module-level name -> the statement that defines it
    imported: dict[str, tuple[str, str]]  # module-level name bound by an import -> (from module or "", what)


@lru_cache(maxsize=None)
def _source(module: ModuleType) -> _Source:
    text = inspect.getsource(module)
    tree = ast.parse(text)
    defined: dict[str, ast.stmt] = {}
    imported: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            defined[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                defined.update({name.id: node for name in names if isinstance(name, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined[node.target.id] = node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = ("", _alias(alias))
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                imported[alias.asname or alias.name] = ("." * node.level + (node.module or ""), _alias(alias))
    return _Source(text.splitlines(), tree, defined, imported)


def _alias(alias: ast.alias) -> str:
    return alias.name + (f" as {alias.asname}" if alias.asname else "")


def _import_lines(imports: list[tuple[str, str]]) -> str:
    """`import x` lines, then one `from m import a, b` line per module, sorted."""
    plain = sorted({f"import {name}" for module, name in imports if not module})
    grouped: dict[str, set[str]] = {}
    for module, name in imports:
        if module:
            grouped.setdefault(module, set()).add(name)
    return "\n".join(plain + [f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(grouped.items())])


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def _segment(definition: Definition) -> str:
    source = _source(definition.module)
    where = f"{definition.module.__name__}.{definition.name}"
    node = source.defined.get(definition.name)
    if node is None:
        raise ValueError(f"{where} is not a top-level definition")
    keep = range(_first_line(node) - 1, node.end_lineno)
    if definition.without:
        if not isinstance(node, ast.ClassDef):
            raise ValueError(f"{where} is not a class: `without` names methods")
        methods = {m.name: m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
        absent = sorted(set(definition.without) - set(methods))
        if absent:
            raise ValueError(f"{where} has no method {absent[0]}")
        dropped = {i for name in definition.without
                   for i in range(_first_line(methods[name]) - 1, methods[name].end_lineno)}
        keep = [i for i in keep if i not in dropped]
    return "\n".join(source.lines[i] for i in keep)


class _References(ast.NodeVisitor):
    """Names a piece of code reads when it runs; annotations are left out (never evaluated: every carried
    module starts with `from __future__ import annotations`)."""

    def __init__(self):
        self.names: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def visit_arg(self, node: ast.arg) -> None:
        pass  # only its annotation is below it

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        for child in (node.target, node.value):
            if child is not None:
                self.visit(child)

    def _function(self, node) -> None:
        for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults, *node.body]:
            if child is not None:
                self.visit(child)

    visit_FunctionDef = visit_AsyncFunctionDef = _function


def carried_module(docstring: str, definitions: Sequence[Definition]) -> str:
    """One module's text: `docstring`, the imports the definitions use, then the definitions in the given
    order (a definition must come after what it needs when the module runs: base classes, decorators,
    module-level expressions)."""
    nodes = [_source(d.module).defined.get(d.name) for d in definitions]
    # every name a carried statement binds (`A, B = ...` carries both)
    carried = {name for d in definitions for name, node in _source(d.module).defined.items() if node in nodes}
    segments, imports, emitted = [], [], []
    for definition, node in zip(definitions, nodes):
        if node is not None and any(node is seen for seen in emitted):
            continue
        emitted.append(node)
        segment = _segment(definition)
        source = _source(definition.module)
        references = _References()
        references.visit(ast.parse(segment))
        for name in sorted(references.names - carried - set(dir(builtins))):
            where = f"{definition.module.__name__}.{definition.name}"
            statement = source.imported.get(name)
            if statement is not None and not (statement[0] or statement[1]).startswith((PROJECT, ".")):
                imports.append(statement)
            elif statement is not None or name in source.defined:
                raise ValueError(f"{where} uses {name}, which is not carried: add its definition")
        segments.append(segment)
    text = f'"""{docstring}"""\n\nfrom __future__ import annotations\n\n' + _import_lines(imports) + "\n\n\n" + \
        "\n\n\n".join(segments) + "\n"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        if any(module.split(".")[0] == PROJECT for module in modules):
            raise ValueError(f"the carried code imports {PROJECT} (line {node.lineno}): it must run without it")
    return text
