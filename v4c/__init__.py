"""v4c: a compiler and runtime for DeepSeek-V4-class language models."""
__version__ = "0.1.0"



def compile(model, output, **options):
    """Compile a checkpoint (or config-only) directory into an artifact; see ``v4c.compiler.compile``."""
    from .compiler import compile as _compile
    return _compile(model, output, **options)


def load(path, device=None, **options):
    """Load a compiled artifact; returns a ``v4c.runtime.Model`` (options: backend="cpu"|"triton"|"reference",
    verify_weights=True)."""
    from .runtime.loader import load as _load
    return _load(path, device=device, **options)


__all__ = ["compile", "load", "__version__"]
