"""The compiled artifact on disk: a manifest that names and hashes every file in it."""
from .manifest import FORMAT, FORMAT_VERSION, Manifest, read_manifest, verify_artifact

__all__ = ["FORMAT", "FORMAT_VERSION", "Manifest", "read_manifest", "verify_artifact"]
