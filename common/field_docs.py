"""A dataclass's field docstrings (the string literal under each field), read from its source.

The CLI builds its help text from them, so each field is documented once, where it is defined.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap


@functools.cache  # the CLI asks at start-up for its help and for the --set list: read the source once
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace folded to single spaces} for the fields that have one.

    The dict is shared between callers: read it, do not change it.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs
