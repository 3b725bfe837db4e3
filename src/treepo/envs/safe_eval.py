"""A safe arithmetic evaluator for the calculator tool: Python expression syntax, never Python's eval.

The text is parsed with `ast.parse(mode="eval")` and walked by our own interpreter, which knows a
whitelist of node types (numbers, + - * / // % **, unary signs, parentheses, calls of a few math
functions, the constants pi and e) and refuses everything else before evaluating anything:
names outside the whitelist (so `__import__`, `open`, any dunder), attribute access, subscripts,
strings, lambdas, comprehensions, keyword arguments. Sizes are bounded before each operation
(an integer result of more than `max_digits` digits is refused, so `9**9**9` and `10**100000`
are never computed), the text and the tree are small, and a wall-time deadline is checked at
every node.

    >>> evaluate("2**10 + sqrt(16)")
    1028.0
    >>> evaluate("().__class__")
    Traceback (most recent call last):
    ...
    treepo.envs.safe_eval.Refused: attribute access is not allowed
"""

from __future__ import annotations

import ast
import math
import operator
import time
from typing import Callable, Union

Number = Union[int, float]

MAX_CHARS = 300
MAX_NODES = 200
MAX_ARGS = 8
MAX_FACTORIAL = 500


class Refused(Exception):
    """The expression is not allowed or cannot be evaluated within the limits; the message says why."""


def _factorial(n: Number) -> int:
    if not isinstance(n, int) or n < 0:
        raise Refused("factorial takes a non-negative integer")
    if n > MAX_FACTORIAL:
        raise Refused(f"factorial of more than {MAX_FACTORIAL} is too large")
    return math.factorial(n)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > 20:
        raise Refused("round takes a whole number of digits between -20 and 20")
    return round(x, ndigits)


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "abs": abs, "floor": math.floor, "ceil": math.ceil,
    "round": _round, "min": min, "max": max, "factorial": _factorial,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ALLOWED = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load,
            *_BINARY, *_UNARY)
_REFUSED = {  # how a refused construct is named in the message to the model
    ast.Attribute: "attribute access is", ast.Subscript: "subscripts are", ast.Lambda: "lambda is",
    ast.ListComp: "comprehensions are", ast.SetComp: "comprehensions are", ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are", ast.NamedExpr: "assignment is", ast.JoinedStr: "strings are",
    ast.Compare: "comparisons are", ast.BoolOp: "and/or are", ast.IfExp: "if/else is", ast.Starred: "unpacking is",
    ast.Tuple: "tuples are", ast.List: "lists are", ast.Set: "sets are", ast.Dict: "dicts are",
}


def _check(tree: ast.AST) -> None:
    """Refuse anything outside the whitelist, before any evaluation."""
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise Refused(f"the expression is too long ({len(nodes)} parts; at most {MAX_NODES})")
    for node in nodes:
        if not isinstance(node, _ALLOWED):
            raise Refused(f"{_REFUSED.get(type(node), type(node).__name__ + ' is')} not allowed")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise Refused("only numbers are allowed (no strings, bytes, booleans or complex numbers)")
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise Refused(f"names starting with '_' ({node.id}) are not allowed")
            if node.id not in FUNCTIONS and node.id not in CONSTANTS:
                raise Refused(f"unknown name {node.id!r}; known: {', '.join([*FUNCTIONS, *CONSTANTS])}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise Refused("only the calculator's functions can be called")
            if node.func.id not in FUNCTIONS:
                raise Refused(f"{node.func.id!r} is not a calculator function; known: {', '.join(FUNCTIONS)}")
            if node.keywords:
                raise Refused("keyword arguments are not allowed")
            if not 1 <= len(node.args) <= MAX_ARGS:
                raise Refused(f"{node.func.id} takes 1 to {MAX_ARGS} arguments")


class _Interpreter:
    def __init__(self, max_digits: int, deadline: float):
        self.max_bits = int(max_digits * math.log2(10)) + 1
        self.deadline = deadline

    def size_ok(self, x: Number) -> Number:
        if isinstance(x, complex):
            raise Refused("the result is not a real number")
        if isinstance(x, int) and x.bit_length() > self.max_bits:
            raise Refused("the result is too large")
        if isinstance(x, float) and not math.isfinite(x):
            raise Refused("the result is not a finite number")
        return x

    def run(self, node: ast.AST) -> Number:
        if time.monotonic() > self.deadline:
            raise Refused("the calculation took too long")
        if isinstance(node, ast.Expression):
            return self.run(node.body)
        if isinstance(node, ast.Constant):
            return self.size_ok(node.value)
        if isinstance(node, ast.Name):
            return CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp):
            return self.size_ok(_UNARY[type(node.op)](self.run(node.operand)))
        if isinstance(node, ast.BinOp):
            a, b = self.run(node.left), self.run(node.right)
            self.before(type(node.op), a, b)
            return self.size_ok(_BINARY[type(node.op)](a, b))
        if isinstance(node, ast.Call):
            args = [self.run(arg) for arg in node.args]
            return self.size_ok(FUNCTIONS[node.func.id](*args))  # type: ignore[union-attr]
        raise Refused(f"{type(node).__name__} is not allowed")  # unreachable after _check

    def before(self, op: type, a: Number, b: Number) -> None:
        """Refuse an operation whose result would be too large, without computing it."""
        if op is ast.Pow:
            if isinstance(b, (int, float)) and isinstance(a, (int, float)) and abs(a) > 1 and b > 0:
                bits = b * math.log2(abs(a))
                if bits > self.max_bits:
                    raise Refused("the result is too large")
        elif op is ast.Mult and isinstance(a, int) and isinstance(b, int):
            if a.bit_length() + b.bit_length() > self.max_bits + 1:
                raise Refused("the result is too large")


def evaluate(text: str, *, max_digits: int = 1000, time_limit: float = 1.0) -> Number:
    """The value of an arithmetic expression, or Refused with the reason. Never runs Python code."""
    if len(text) > MAX_CHARS:
        raise Refused(f"the expression is too long ({len(text)} characters; at most {MAX_CHARS})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise Refused(f"not an arithmetic expression ({e.msg})") from None
    except (ValueError, RecursionError, MemoryError):
        raise Refused("not an arithmetic expression") from None
    _check(tree)
    try:
        return _Interpreter(max_digits, time.monotonic() + time_limit).run(tree)
    except Refused:
        raise
    except ZeroDivisionError:
        raise Refused("division by zero") from None
    except OverflowError:
        raise Refused("the result is too large") from None
    except (ValueError, TypeError) as e:
        raise Refused(f"math error ({e})") from None
    except RecursionError:
        raise Refused("the expression is nested too deeply") from None


def format_number(x: Number) -> str:
    """Integers exactly; floats to 12 significant digits."""
    return str(x) if isinstance(x, int) else format(x, ".12g")
