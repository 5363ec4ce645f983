"""`v4c plan`: serving recipes and their cost, predicted from the compiled model.

``make_plan(model, gpu=..., gpus=..., input_len=..., output_len=...)`` returns the plan as a dict (what
``v4c plan --json`` prints); modules: ``devices`` (datasheets), ``efficiency`` (reachable fractions),
``kernels`` and ``step`` (a step's time from its kernels), ``pool`` (one serving instance),
``serving`` (the steady state under load), ``memory``, ``choose`` (profiles), ``sweep`` (Pareto),
``published`` (the measurements it is checked against), ``output`` (text).
"""
from .plan import make_plan

__all__ = ["make_plan"]
