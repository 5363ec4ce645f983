"""An op's signature: named operands with roles, and typed attributes.

Operands are spelled ``name[?][:role[/tag]]``: ``?`` marks a trailing operand a node may leave
out; the role (default ``activation``) says what the value is. The tag is ``gemm`` on a weight the
op multiplies by (the only params that may be quantised) and, on a cache or state operand, the kind
of state buffer it must be. Attributes are spelled ``name:type[?]``; ``?`` marks one the node may
leave out or set to null (the reference has a default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("activation", "weight", "cache", "state")  # cache: rows in a cache format; state: any other buffer
# what a state buffer holds
STATE_KINDS = ("window", "compressed_rows", "indexer_keys", "compressor_state")
# bool is an int to Python: it is accepted only where bool is asked for
ATTR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "tuple": (tuple,)}


@dataclass(frozen=True)
class Operand:
    name: str
    role: str = "activation"
    optional: bool = False
    gemm: bool = False
    kind: str | None = None  # cache/state operands: the kind of buffer (None: any)

    @staticmethod
    def parse(spec: str) -> "Operand":
        name, _, rest = spec.partition(":")
        role, _, tag = (rest or "activation").partition("/")
        gemm = tag == "gemm"
        kind = tag if tag and not gemm else None
        if role not in ROLES or (gemm and role != "weight") or (kind and (kind not in STATE_KINDS
                                                                           or role not in ("cache", "state"))):
            raise ValueError(f"bad operand spec {spec!r}")
        return Operand(name.rstrip("?"), role, name.endswith("?"), gemm, kind)

    def __str__(self) -> str:
        tag = "/gemm" if self.gemm else f"/{self.kind}" if self.kind else ""
        return f"{self.name}{'?' * self.optional}:{self.role}{tag}"


@dataclass(frozen=True)
class Attr:
    name: str
    type: str
    optional: bool = False

    @staticmethod
    def parse(spec: "str | Attr") -> "Attr":
        if isinstance(spec, Attr):
            return spec
        name, _, typ = spec.partition(":")
        a = Attr(name, typ.rstrip("?"), typ.endswith("?"))
        if a.type not in ATTR_TYPES:
            raise ValueError(f"bad attribute spec {spec!r}")
        return a

    def accepts(self, v: Any) -> bool:
        if v is None:
            return self.optional
        return isinstance(v, ATTR_TYPES[self.type]) and (isinstance(v, bool) == (self.type == "bool"))

    def __str__(self) -> str:
        return f"{self.name}:{self.type}{'?' * self.optional}"


def parse_operands(specs) -> tuple[Operand, ...]:
    ops = tuple(s if isinstance(s, Operand) else Operand.parse(s) for s in specs)
    seen_optional = False
    for o in ops:
        if seen_optional and not o.optional:
            raise ValueError(f"operand {o.name!r} follows an optional operand")
        seen_optional |= o.optional
    if len({o.name for o in ops}) != len(ops):
        raise ValueError(f"operand names repeat: {[o.name for o in ops]}")
    return ops


def check_attrs(attrs: dict, schema: tuple[Attr, ...], op: str) -> str | None:
    """Why ``attrs`` do not fit ``schema``, or None."""
    known = {a.name: a for a in schema}
    for k in sorted(attrs):
        if k not in known:
            return f"unknown attribute {k!r} ({op} takes {', '.join(map(str, schema)) or 'none'})"
        if not known[k].accepts(attrs[k]):
            return f"attribute {k!r} must be {known[k].type}{' or null' * known[k].optional}, got {attrs[k]!r}"
    for a in schema:
        if not a.optional and a.name not in attrs:
            return f"missing attribute {a.name!r} ({op} takes {', '.join(map(str, schema))})"
    return None
