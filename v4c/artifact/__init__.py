"""The compiled artifact on disk: a manifest that names and hashes every file in it, sealed by its own digest.

This package owns the layout: ``ArtifactWriter`` (compile, shard) and ``update_kernels`` (tune) write it,
``open_artifact`` -> ``Artifact`` reads it (load, distributed load, inspect, the CLI). Nothing else spells
the manifest's keys or the artifact's paths.
"""
from .layout import has_manifest
from .manifest import (FORMAT, FORMAT_VERSION, Artifact, Manifest, aot_binaries, open_artifact, open_weights,
                       read_kernel_module, read_manifest, update_manifest, verify_artifact, write_manifest)
from .writer import ArtifactWriter, put_aot_binary, update_kernels

__all__ = ["FORMAT", "FORMAT_VERSION", "Artifact", "ArtifactWriter", "Manifest", "aot_binaries", "has_manifest",
           "open_artifact", "open_weights", "put_aot_binary", "read_kernel_module", "read_manifest",
           "update_kernels", "update_manifest", "verify_artifact", "write_manifest"]
