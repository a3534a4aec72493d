"""Dead-function elimination for generated modules (as a linker drops what nothing calls)."""

from __future__ import annotations

import ast


def _removable(node: ast.stmt) -> bool:
    """A Triton function, or a private undecorated one: what the module itself calls, never its users."""
    if not isinstance(node, ast.FunctionDef):
        return False
    if not node.decorator_list:
        return node.name.startswith("_")
    jit = node.decorator_list[0]
    return len(node.decorator_list) == 1 and isinstance(jit, ast.Attribute) and jit.attr == "jit" \
        and isinstance(jit.value, ast.Name) and jit.value.id == "triton"


def _first_line(node: ast.FunctionDef, lines: list[str]) -> int:
    """The 0-based line where ``node`` begins: its decorator, or the comment lines right above it."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    return start


def without_unused_functions(source: str) -> str:
    """``source`` without the top-level functions nothing else in it names, until none is left: the
    shared helpers a spec does not call and the kernels a variant never launches (those of the
    backward pass where a paged cache refuses gradients). Only Triton functions and private
    undecorated ones can go (with the comment lines right above them); the module's public functions
    and those a decorator registers stay."""
    while True:
        tree = ast.parse(source)
        named = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        unused = [node for node in tree.body if _removable(node) and node.name not in named]
        if not unused:
            return source
        lines = source.splitlines(keepends=True)
        for node in reversed(unused):
            del lines[_first_line(node, lines):node.end_lineno]
        source = "".join(lines)
