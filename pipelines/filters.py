"""Search filters: a small, checked SQL subset, parsed by sqlglot and rendered again for LanceDB.

A filter reaches LanceDB as a DataFusion predicate, where any column and any function would run: a
client could read columns the API never returns one yes/no at a time (``source LIKE '/home/%'``), learn
the schema from an error, or run a regular expression over every row with no time limit. So a filter is
parsed, checked against an allow-list of columns with their types, and written out again from the
parsed tree; the text the client sent never reaches LanceDB.

Allowed: comparisons (``= != <> < <= > >=``) and ``BETWEEN`` of a column with a literal, ``IN`` a list
of literals, ``LIKE``/``ILIKE`` a string pattern, ``IS [NOT] NULL``, ``AND``/``OR``/``NOT`` and
parentheses. Not allowed: function calls, subscripts, subqueries, arithmetic, column-to-column
comparisons, columns outside the allow-list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

# What a search request may filter on by default: the columns a hit returns, and the chunk's position.
# ``source`` (a path on the ingesting machine) and ``metadata`` (every other field of a record) are
# never returned; a config adds them (serve.filter_columns) where the operator means to expose them.
DEFAULT_COLUMNS: dict[str, str] = {
    "doc_id": "string",
    "chunk_id": "string",
    "title": "string",
    "text": "string",
    "chunk_index": "int",
}
# Every scalar column of a shard table, for the operator's own tools (embedpipe query).
TABLE_COLUMNS: dict[str, str] = {**DEFAULT_COLUMNS, "source": "string", "metadata": "string"}

MAX_NODES = 256
MAX_IN_ITEMS = 1000
_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "=", exp.NEQ: "!=", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">=",
}  # fmt: skip
_INT64 = 2**63


class FilterError(ValueError):
    """A filter outside the allowed subset; the message names what is not allowed."""


def allowed_columns(extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The default filterable columns plus ``extra`` names of other scalar shard columns.

    Raises:
        ValueError: a name that is no scalar column of a shard table.
    """
    unknown = [name for name in extra if name not in TABLE_COLUMNS]
    if unknown:
        raise ValueError(
            f"Unknown filter column(s): {', '.join(map(repr, unknown))}. "
            f"Supported: {', '.join(sorted(TABLE_COLUMNS))}."
        )
    return {**DEFAULT_COLUMNS, **{name: TABLE_COLUMNS[name] for name in extra}}


def compile_filter(text: str, *, columns: Mapping[str, str] = DEFAULT_COLUMNS) -> str:
    """Check a filter and render it as a LanceDB predicate.

    Args:
        text: the filter as the client sent it, e.g. ``doc_id IN ('a', 'b') AND chunk_index < 3``.
        columns: filterable column name -> ``"string"`` or ``"int"``.

    Returns:
        The predicate, written from the parsed tree (columns quoted, literals escaped).

    Raises:
        FilterError: syntax, a construct or column that is not allowed, or a type mismatch.
    """
    if "\x00" in text:
        raise FilterError("invalid filter: NUL characters are not allowed")
    try:
        statements = sqlglot.parse(text)
    except (ParseError, TokenError) as exc:
        errors = getattr(exc, "errors", None) or [{}]
        where = errors[0].get("col")
        raise FilterError(
            f"invalid filter: cannot parse it{f' (near character {where})' if where else ''}"
        ) from None
    except RecursionError:
        raise FilterError("invalid filter: nested too deeply") from None
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise FilterError("invalid filter: give one predicate (no ';')")
    tree = statements[0]
    nodes = sum(1 for _ in tree.walk())
    if nodes > MAX_NODES:
        raise FilterError(f"invalid filter: {nodes} terms, over the limit of {MAX_NODES}")
    try:
        return _Renderer(columns).condition(tree)
    except RecursionError:
        raise FilterError("invalid filter: nested too deeply") from None


class _Renderer:
    def __init__(self, columns: Mapping[str, str]):
        self.columns = columns

    def condition(self, node: exp.Expression) -> str:
        if isinstance(node, exp.Paren):
            return f"({self.condition(node.this)})"
        if isinstance(node, exp.And | exp.Or):
            word = "AND" if isinstance(node, exp.And) else "OR"
            return f"({self.condition(node.this)} {word} {self.condition(node.expression)})"
        if isinstance(node, exp.Not):
            return f"(NOT {self.condition(node.this)})"
        if type(node) in _COMPARISONS:
            return self._comparison(node)
        if isinstance(node, exp.Between):
            name, kind = self.column(node.this)
            low, high = (
                self.literal(node.args["low"], kind, name),
                self.literal(node.args["high"], kind, name),
            )
            return f"({_quote(name)} BETWEEN {low} AND {high})"
        if isinstance(node, exp.In):
            if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
                raise FilterError("invalid filter: IN takes a list of values, not a subquery")
            name, kind = self.column(node.this)
            items = node.expressions
            if not items or len(items) > MAX_IN_ITEMS:
                raise FilterError(f"invalid filter: IN takes 1 to {MAX_IN_ITEMS} values")
            return f"({_quote(name)} IN ({', '.join(self.literal(v, kind, name) for v in items)}))"
        if isinstance(node, exp.Like | exp.ILike):
            name, kind = self.column(node.this)
            if kind != "string":
                raise FilterError(f"invalid filter: LIKE needs a text column; {name!r} holds numbers")
            word = "LIKE" if isinstance(node, exp.Like) else "ILIKE"
            return f"({_quote(name)} {word} {self.literal(node.expression, 'string', name)})"
        if isinstance(node, exp.Is):
            name, _ = self.column(node.this)
            if not isinstance(node.expression, exp.Null):
                raise FilterError("invalid filter: IS takes NULL only (IS NULL, IS NOT NULL)")
            return f"({_quote(name)} IS NULL)"
        raise FilterError(f"invalid filter: {_describe(node)} is not allowed. {_ALLOWED}")

    def _comparison(self, node: exp.Expression) -> str:
        left, right = node.this, node.expression
        op = _COMPARISONS[type(node)]
        if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
            left, right = right, left
            op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        name, kind = self.column(left)
        return f"({_quote(name)} {op} {self.literal(right, kind, name)})"

    def column(self, node: exp.Expression) -> tuple[str, str]:
        if not isinstance(node, exp.Column):
            raise FilterError(f"invalid filter: {_describe(node)} is not allowed where a column belongs")
        if node.table or not isinstance(node.this, exp.Identifier):
            raise FilterError("invalid filter: qualified column names are not allowed")
        name = node.name
        if name not in self.columns:
            hint = " (text values take single quotes)" if node.this.quoted else ""
            raise FilterError(
                f"invalid filter: {name[:64]!r} is not a filterable column{hint}. "
                f"Filterable: {', '.join(sorted(self.columns))}."
            )
        return name, self.columns[name]

    def literal(self, node: exp.Expression, kind: str, column: str) -> str:
        negative = isinstance(node, exp.Neg)
        if negative:
            node = node.this
        if isinstance(node, exp.Column):
            raise FilterError(
                f"invalid filter: compare {column!r} with a value, not a column"
                + (" (text values take single quotes)" if node.this.quoted else "")
            )
        if not isinstance(node, exp.Literal):
            raise FilterError(f"invalid filter: {_describe(node)} is not allowed where a value belongs")
        if node.is_string:
            if kind != "string" or negative:
                raise FilterError(f"invalid filter: {column!r} holds numbers; compare it with a number")
            return "'" + node.this.replace("'", "''") + "'"
        if kind != "int":
            raise FilterError(f"invalid filter: {column!r} holds text; put the value in single quotes")
        try:
            number = float(node.this) if any(c in node.this for c in ".eE") else int(node.this)
        except ValueError:
            raise FilterError(f"invalid filter: {node.this[:32]!r} is not a number") from None
        number = -number if negative else number
        if isinstance(number, float):
            if not math.isfinite(number):
                raise FilterError("invalid filter: numbers must be finite")
            return repr(number)
        if not -_INT64 <= number < _INT64:
            raise FilterError("invalid filter: the number is out of range")
        return str(number)


_ALLOWED = (
    "Allowed: comparisons, BETWEEN, IN (values), LIKE/ILIKE, IS [NOT] NULL, AND/OR/NOT over "
    "filterable columns."
)


def _describe(node: exp.Expression) -> str:
    if isinstance(node, exp.Func):
        name = node.sql_name() if not isinstance(node, exp.Anonymous) else str(node.this)
        return f"the function {name[:64].upper()}()"
    if isinstance(node, exp.Bracket):
        return "a subscript ([...])"
    if isinstance(node, exp.Subquery | exp.Select | exp.Query):
        return "a subquery"
    if isinstance(node, exp.Binary):
        return f"the operator {node.key.upper()}"
    return f"{node.key.upper()}"


def _quote(name: str) -> str:
    # Names come from the allow-list (letters, digits, underscores), so backticks need no escaping.
    return f"`{name}`"
