"""Triton code generation for fused ops: ``templates/`` holds one self-contained kernel module per
family (kernels, launchers, meta-parameter spaces and their constraints); ``emit.py`` renders the
families a graph uses (prelude inlined) into the artifact's kernel modules and lists every call site;
``quantized.py`` maps ops on FP8/MXFP4 weights to their quantised launchers."""
