"""The cpu backend: fast PyTorch implementations of the ops that dominate a CPU run, and the C
helpers (``native/``) under them.

Each implementation has its op's signature and result; ``registry`` lists them per op with the
checkers that choose between them. The references in ``v4c/graph/ops`` stay the definition (the
``reference`` backend runs them unchanged) and the tests hold each implementation here to its
reference on random inputs.
"""
