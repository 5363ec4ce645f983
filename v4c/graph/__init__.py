"""The IR: typed values, a closed op registry, a verifier and a text form that round-trips."""
from . import ops  # noqa: F401  (registers every op)
from .ir import Graph, Node
from .registry import OPS, Cost, get_op
from .text import parse_graph, print_graph
from .types import DTYPES, TensorType
from .verify import verify

__all__ = ["Graph", "Node", "OPS", "Cost", "get_op", "parse_graph", "print_graph", "DTYPES", "TensorType", "verify"]
