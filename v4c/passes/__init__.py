"""Graph-to-graph passes: fusion of the unfused reference graph into one op per GPU kernel."""
from .base import Pass, PassManager, PassResult, RewritePass
from .pipeline import all_pass_names, default_pipeline

__all__ = ["Pass", "PassManager", "PassResult", "RewritePass", "all_pass_names", "default_pipeline"]
