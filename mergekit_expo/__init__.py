"""ExPO (model extrapolation) as a mergekit merge method.

Importing this package registers `expo` with mergekit; installing it does the
same for every Python process through a start-up hook (see registration.py).
"""

from mergekit_expo.method import decompose, expo_merge, extrapolate
from mergekit_expo.registration import install, register

try:
    import _mergekit_expo_startup  # noqa: F401  (installed beside the package)
except ImportError:
    pass

install()

__all__ = ["decompose", "expo_merge", "extrapolate", "register"]
