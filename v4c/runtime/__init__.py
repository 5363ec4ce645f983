"""The thin runtime: loads an artifact and runs it. Imports only graph, io and artifact code."""
from .loader import load
from .model import Model
from .session import Session

__all__ = ["load", "Model", "Session"]
