"""Op families of the IR. Importing this package fills ``registry.OPS``."""
from . import attention, collective, core, mhc, moe  # noqa: F401
from . import fused  # noqa: F401  (after the ops its recipes use)
