"""The public names of tfa-widgets and a check that each has a NumPy-style docstring.

Used by the docs build (a hook that fails `mkdocs build` on a missing docstring) and by
``tests/test_docstrings.py``. Only the standard library is imported here, so the test runs
without the docs extra.

Public names: the functions and classes listed in ``__all__`` of the public packages (plus
``TFAEngine``, which ``tfa_widgets`` imports lazily), and the public methods and properties of
those classes. A callable with parameters needs a ``Parameters``
section naming each one; one that returns a value needs a ``Returns`` (or ``Yields``) section;
an exception class raised directly in its body must be named under ``Raises``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tfa_widgets"
PUBLIC_PACKAGES = (
    PACKAGE,
    f"{PACKAGE}.data",
    f"{PACKAGE}.eval",
    f"{PACKAGE}.viz",
    f"{PACKAGE}.widgets",
)
SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    """One docstring problem: the dotted name of the public object and what is wrong."""

    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


def public_objects() -> Iterator[tuple[str, object]]:
    """Yield ``(dotted name, object)`` for each public function, class, method and property."""
    for qualified, obj in _exported():
        yield qualified, obj
        if inspect.isclass(obj):
            yield from _members(qualified, obj)


def exported_names() -> list[str]:
    """Return the dotted names (where defined) of the exported functions and classes."""
    return [qualified for qualified, _ in _exported()]


def _exported() -> list[tuple[str, object]]:
    found: dict[int, tuple[str, object]] = {}
    for package_name in PUBLIC_PACKAGES:
        package = importlib.import_module(package_name)
        names = list(package.__all__) + (["TFAEngine"] if package_name == PACKAGE else [])
        for name in names:
            obj = getattr(package, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[id(obj)] = (f"{obj.__module__}.{obj.__qualname__}", obj)
    return sorted(found.values(), key=lambda item: item[0])


def _members(qualified: str, cls: type) -> Iterator[tuple[str, object]]:
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, staticmethod | classmethod):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            yield f"{qualified}.{name}", member


def sections(doc: str) -> dict[str, str]:
    """Return the NumPy-style sections of a docstring by title (``""`` holds the summary)."""
    doc = inspect.cleandoc(doc)
    found, start, title = {}, 0, ""
    for match in SECTION.finditer(doc):
        found[title] = doc[start : match.start()]
        title, start = match.group(1).strip(), match.end()
    found[title] = doc[start:]
    return found


def documented_names(section: str) -> set[str]:
    """Return the names a Parameters-like section documents (``a, b : type`` names both)."""
    names = set()
    for line in section.splitlines():
        if line and not line[0].isspace():
            head = line.split(" : ")[0].split(":")[0]
            names.update(part.strip().lstrip("*") for part in head.split(","))
    return names - {""}


def check(name: str, obj: object) -> list[Problem]:
    """Return the docstring problems of one public object (none when it is complete)."""
    if isinstance(obj, property):
        doc = obj.fget.__doc__ if obj.fget else None
        return [] if doc and doc.strip() else [Problem(name, "no docstring")]
    doc = obj.__doc__ if not inspect.isclass(obj) else vars(obj).get("__doc__")
    if not doc or not doc.strip():
        return [Problem(name, "no docstring")]
    parts = sections(doc)
    if inspect.isclass(obj):
        return _check_class(name, obj, parts)
    return _check_function(name, obj, parts)


def _check_class(name: str, cls: type, parts: dict[str, str]) -> list[Problem]:
    if issubclass(cls, BaseException):
        return []
    init = vars(cls).get("__init__")
    if init is None and not hasattr(cls, "__dataclass_fields__"):
        return []
    target = init if init is not None else cls
    params = _parameters(target)
    documented = documented_names(parts.get("Parameters", "") + parts.get("Attributes", ""))
    if init is not None and init.__doc__:
        documented |= documented_names(sections(init.__doc__).get("Parameters", ""))
    missing = [p for p in params if p not in documented]
    problems = (
        [Problem(name, f"parameters not documented: {', '.join(missing)}")] if missing else []
    )
    if init is not None:
        problems += _check_raises(name, init, parts)
    return problems


def _check_function(name: str, func: Callable, parts: dict[str, str]) -> list[Problem]:
    problems = []
    params = _parameters(func)
    missing = [p for p in params if p not in documented_names(parts.get("Parameters", ""))]
    if missing:
        problems.append(Problem(name, f"parameters not documented: {', '.join(missing)}"))
    if _returns_value(func) and not ({"Returns", "Yields"} & parts.keys()):
        problems.append(Problem(name, "no Returns section"))
    return problems + _check_raises(name, func, parts)


def _parameters(func: Callable) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [p for p in signature.parameters if p not in ("self", "cls")]


def _returns_value(func: Callable) -> bool:
    annotation = inspect.signature(func).return_annotation
    if annotation in (None, "None"):
        return False
    if annotation is not inspect.Signature.empty:
        return True
    tree = _tree(func)
    return tree is not None and any(
        isinstance(node, ast.Return | ast.Yield) and getattr(node, "value", None) is not None
        for node in _own_nodes(tree)
    )


def _check_raises(name: str, func: Callable, parts: dict[str, str]) -> list[Problem]:
    tree = _tree(func)
    if tree is None:
        return []
    raised = set()
    for node in _own_nodes(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id[:1].isupper():
                raised.add(exc.id)
    missing = sorted(r for r in raised if r not in parts.get("Raises", ""))
    return [Problem(name, f"Raises does not name {', '.join(missing)}")] if missing else []


def _tree(func: Callable) -> ast.AST | None:
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    return ast.parse(source).body[0]


def _own_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Walk a function body without entering nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))


def problems() -> list[Problem]:
    """Return every docstring problem of the package's public names."""
    return [problem for name, obj in public_objects() for problem in check(name, obj)]


def unreferenced(api_dir: Path) -> list[str]:
    """Return the exported names that no ``::: name`` line of the pages in ``api_dir`` renders."""
    pages = "\n".join(page.read_text() for page in sorted(Path(api_dir).glob("*.md")))
    referenced = {line.split()[1] for line in pages.splitlines() if line.startswith("::: ")}
    return [name for name in exported_names() if name not in referenced]
