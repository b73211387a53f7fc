"""Start-up hook, run from mergekit_expo.pth in every Python process.

mergekit has no plugin discovery, so this watches for the first import of the
mergekit modules that matter and registers `expo` right after they load. It only
uses `sys`, so processes that never import mergekit pay for one tiny import.
"""

import sys

_TARGETS = frozenset({"mergekit.merge_methods", "mergekit.merge", "mergekit.scripts.multimerge"})


class _Loader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from mergekit_expo.registration import on_mergekit_import

        on_mergekit_import(module.__name__)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class MergekitExpoFinder:
    """Meta-path finder that wraps the real loader of the watched modules."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


if MergekitExpoFinder not in sys.meta_path:
    sys.meta_path.insert(0, MergekitExpoFinder)
