"""amalgam-plugin: Optimizer Amalgamation (Huang et al., ICLR 2022) for PyTorch.

``from amalgam_plugin import AmalgamOptimizer, amalgamate``: both are imported on first use, so
``import amalgam_plugin`` alone loads neither torch nor transformers nor timm.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"AmalgamOptimizer": "amalgam_plugin.optim", "amalgamate": "amalgam_plugin.engine"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amalgam_plugin' has no attribute {name!r}")


__all__ = ["AmalgamOptimizer", "amalgamate"]
