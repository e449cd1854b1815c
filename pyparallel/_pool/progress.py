"""Progress of a call, advanced as its tasks *finish* (not as they are submitted).

``progress=`` on map, imap, imap_unordered, starmap and their ``_async`` forms takes:

- ``True``: a tqdm bar (``tqdm.auto``: the terminal bar in a terminal, the widget in Jupyter),
  with a total when the input has a length; tqdm (and ipywidgets, for Jupyter) are the
  optional ``progress`` extra, and ImportError names it when one is missing;
- a tqdm instance (anything with ``update(n)``): it is advanced, and closed at the end only
  if it was given without a total;
- a callable: called as ``progress(done, total)`` after each finished chunk (``total`` is None
  for an input without a length).

Off by default; when off, a result does one ``is None`` check per chunk.
"""
from __future__ import annotations

import sys
import threading
import traceback

__all__ = ["make"]


def _in_jupyter():
    """Whether this process is a Jupyter kernel (tqdm.auto's own test: an IPython kernel app)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", ())


def _tqdm():
    try:
        from tqdm.auto import tqdm
        if _in_jupyter():
            import ipywidgets  # noqa: F401 - without it tqdm.auto warns and prints a text bar
    except ImportError as e:
        need = "ipywidgets in Jupyter" if e.name == "ipywidgets" else "tqdm"
        raise ImportError(f"progress=True needs {need}: pip install 'pyparallel[progress]'") from e
    return tqdm


class _Bar:
    __slots__ = ("bar", "own")

    def __init__(self, bar, own):
        self.bar = bar
        self.own = own

    def update(self, n):
        self.bar.update(n)

    def close(self):
        if self.own:
            self.bar.close()
        else:
            self.bar.refresh()


class _Callback:
    __slots__ = ("fn", "total", "done", "lock")

    def __init__(self, fn, total):
        self.fn = fn
        self.total = total
        self.done = 0
        self.lock = threading.Lock()

    def update(self, n):
        with self.lock:
            self.done += n
            try:
                self.fn(self.done, self.total)
            except Exception:  # noqa: BLE001 - a progress callback must not fail the call
                print(f"Exception in pyparallel progress callback {self.fn!r}:", file=sys.stderr)
                traceback.print_exc()

    def close(self):
        pass


def make(progress, total):
    """The progress sink for ``progress=`` (None when off); raises before any work starts
    when ``progress`` is not one of the accepted kinds, or tqdm is missing."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return _Bar(_tqdm()(total=total), own=True)
    if hasattr(progress, "update") and hasattr(progress, "close"):
        own = False
        if getattr(progress, "total", 0) is None and total is not None:
            progress.total = total
            own = True
        return _Bar(progress, own)
    if callable(progress):
        return _Callback(progress, total)
    raise TypeError(f"progress must be True, a tqdm bar or a callable(done, total), not "
                    f"{type(progress).__name__}")
