"""ExPO (model extrapolation) as a mergekit merge method.

Importing this package registers `expo` with mergekit and routes `expo` merges
through this package's run; installing it does the same for every Python
process through a start-up hook (see registration.py).
"""

from mergekit_expo.method import decompose, expo_merge, extrapolate
from mergekit_expo.registration import install, register
from mergekit_expo.rules import check_alpha, require_base_model

try:
    import _mergekit_expo_startup  # noqa: F401  (installed beside the package)
except ImportError:
    pass

install()

__all__ = ["check_alpha", "decompose", "expo_merge", "extrapolate", "register", "require_base_model"]
