"""Safe arithmetic evaluation of untrusted, model-generated expressions.

The Countdown reference (TinyZero) runs Python ``eval`` on the model's answer after a character
whitelist; this project never executes model text (docs/method.md section 7).  Instead a tiny tokenizer
and recursive-descent parser evaluate the grammar

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := '-' unary | primary
    primary := NUMBER | '(' expr ')'
    NUMBER  := digits ['.' digits]

with exact ``fractions.Fraction`` arithmetic.  Everything is bounded so that hostile input costs
O(1) or O(len) time: the text length, the nesting depth (parentheses and unary minus chains) and
the magnitude of every literal and intermediate result (numerator and denominator).  There is no
exponent operator: ``**`` and ``^`` are invalid.  Anything outside the grammar or the bounds,
including division by zero, raises :class:`InvalidExpression`.
"""
from __future__ import annotations

from fractions import Fraction

MAX_LENGTH = 200
"""Longest accepted expression in characters (checked before any scanning)."""
MAX_DEPTH = 20
"""Deepest accepted nesting of parentheses and unary minus."""
MAX_ABS = 10**12
"""Largest accepted |value| of any literal or intermediate result."""
MAX_DENOMINATOR = 10**12
"""Largest accepted denominator of any literal or intermediate result (bounds Fraction cost)."""

_OPERATORS = "+-*/()"
_WHITESPACE = " \t\r\n"


class InvalidExpression(ValueError):
    """The text is not a bounded arithmetic expression of the accepted grammar."""


def _tokenize(expr: str) -> list[str]:
    """Split ``expr`` into number and operator tokens; reject any other character."""
    if not isinstance(expr, str):
        raise InvalidExpression("expression must be a string")
    if len(expr) > MAX_LENGTH:  # before scanning: a megabyte answer is rejected at once
        raise InvalidExpression(f"expression longer than {MAX_LENGTH} characters")
    tokens: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in _WHITESPACE:
            i += 1
        elif c in _OPERATORS:
            tokens.append(c)
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= expr[j] <= "9":
                j += 1
            if j < n and expr[j] == ".":
                j += 1
                k = j
                while j < n and "0" <= expr[j] <= "9":
                    j += 1
                if j == k:
                    raise InvalidExpression("a decimal point must be followed by digits")
            tokens.append(expr[i:j])
            i = j
        else:
            raise InvalidExpression(f"character {c!r} is not allowed")
    if not tokens:
        raise InvalidExpression("empty expression")
    return tokens


def _checked(value: Fraction) -> Fraction:
    """Return ``value`` if it lies inside the magnitude bounds, else raise."""
    if value.denominator > MAX_DENOMINATOR or abs(value.numerator) > MAX_ABS * value.denominator:
        raise InvalidExpression("number out of bounds")
    return value


class _Parser:
    """Recursive-descent evaluator over a token list (recursion bounded by MAX_DEPTH)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise InvalidExpression(f"nesting deeper than {MAX_DEPTH}")

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = _checked(value + right if op == "+" else value - right)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.unary()
            if op == "*":
                value = _checked(value * right)
            elif right == 0:
                raise InvalidExpression("division by zero")
            else:
                value = _checked(value / right)
        return value

    def unary(self) -> Fraction:
        if self.peek() == "-":
            self.take()
            self.enter()
            value = -self.unary()
            self.depth -= 1
            return value
        return self.primary()

    def primary(self) -> Fraction:
        token = self.peek()
        if token is None:
            raise InvalidExpression("unexpected end of expression")
        if token == "(":
            self.take()
            self.enter()
            value = self.expr()
            if self.peek() != ")":
                raise InvalidExpression("missing ')'")
            self.take()
            self.depth -= 1
            return value
        if token[0].isdigit():
            self.take()
            return _checked(Fraction(token))
        raise InvalidExpression(f"unexpected {token!r}")


def evaluate(expr: str) -> Fraction:
    """Exact value of ``expr``; raises :class:`InvalidExpression` for anything invalid."""
    parser = _Parser(_tokenize(expr))
    value = parser.expr()
    if parser.peek() is not None:
        raise InvalidExpression(f"unexpected {parser.peek()!r}")
    return value


def try_evaluate(expr: str) -> Fraction | None:
    """Like :func:`evaluate` but returns ``None`` instead of raising."""
    try:
        return evaluate(expr)
    except InvalidExpression:
        return None


def numbers_in(expr: str) -> list[int]:
    """The integer literals of ``expr`` in order of appearance.

    Countdown checks that these are exactly the given numbers.  A decimal literal (``1.5``,
    ``3.0``) is not one of the given integers, so it raises :class:`InvalidExpression`, as do
    characters outside the grammar and over-long text.  Unary minus is not part of a literal
    (``-3`` uses the number 3), as in the reference's ``re.findall(r"\\d+")``.
    """
    numbers = []
    for token in _tokenize(expr):
        if token[0].isdigit():
            if "." in token:
                raise InvalidExpression(f"non-integer literal {token!r}")
            numbers.append(int(token))
    return numbers
