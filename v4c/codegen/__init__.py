"""Triton code generation for fused ops. Not built yet: the runtime runs the ops' PyTorch references."""
