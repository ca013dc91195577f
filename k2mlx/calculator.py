"""A safe arithmetic evaluator: the `calculator` tool of the TUI and of k2-nano's training data.

Only numbers, + - * / // % **, unary minus and parentheses are accepted (parsed with `ast`, never
`eval`), and powers are bounded so "9 ** 9 ** 9" cannot hang the app."""
from __future__ import annotations

import ast
import math
import operator

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_EXPONENT = 1000
MAX_RESULT_BITS = 100_000  # a power whose result would be bigger is refused before it is computed


def safe_eval(expression: str) -> int | float:
    """Evaluate an arithmetic expression; raises ValueError on anything else (names, calls, huge
    powers, division by zero)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or (
                    abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > MAX_RESULT_BITS)):
                raise ValueError(f"the power {left!r:.20} ** {right!r:.20} is too large")
            return _BIN[type(node.op)](left, right)
        raise ValueError(f"unsupported expression: {expression!r} (numbers and + - * / // % ** ( ) only)")

    try:
        return ev(ast.parse(str(expression).strip(), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"unsupported expression: {expression!r}") from e
    except ZeroDivisionError as e:
        raise ValueError(f"division by zero in {expression!r}") from e


def format_number(value: int | float) -> str:
    """391 for 391 and 391.0; up to 12 significant digits otherwise."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"
