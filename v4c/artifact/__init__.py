"""The compiled artifact on disk: a manifest that names and hashes every file in it, sealed by its own digest."""
from .manifest import (FORMAT, FORMAT_VERSION, Manifest, open_weights, read_manifest, update_manifest,
                       verify_artifact, write_manifest)

__all__ = ["FORMAT", "FORMAT_VERSION", "Manifest", "open_weights", "read_manifest", "update_manifest",
           "verify_artifact", "write_manifest"]
