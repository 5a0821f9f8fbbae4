"""fastnets: fused Triton and CUDA C++ kernels for the classic deep-network family.

    import fastnets
    from fastnets import functional as FF, nn as fnn
    fastnets.backends()                 # what can run here, and why not
    with fastnets.use_backend("triton"):
        y = FF.max_pool2d(x, 3, 2, 1)
"""
from fastnets._dispatch import BackendError, backends, current_backend, use_backend
from fastnets import functional, nn  # noqa: E402
from fastnets import models  # noqa: E402
from fastnets.fuse import fuse  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BackendError", "backends", "current_backend", "use_backend", "functional", "nn", "models", "fuse",
           "__version__"]
