"""Where timmface keeps what it can compute again: one folder for every command.

``$TIMMFACE_CACHE`` when set, else ``$XDG_CACHE_HOME/timmface``, else ``~/.cache/timmface``. Inside it:

* ``demo/<settings hash>/``: the built-in demo dataset (``train.rec``, ``demo_val.bin``, ...), generated on first
  use by ``timmface train --config configs/demo.yaml`` (and by ``timmface eval`` of a demo run, if it was deleted);
* ``idx/<path hash>.npz``: the parsed ``train.idx`` of every RecordIO dataset opened, keyed by the index's
  absolute path and checked against its size, mtime and a hash of its head and tail (a changed index is parsed
  again).

Nothing is ever written into a dataset's own folder, which may be read-only or shared. Deleting the cache folder
is always safe: it costs the time to build its contents again.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """The cache folder, by the rule in the module docstring (not created here)."""
    if os.environ.get("TIMMFACE_CACHE"):
        return Path(os.environ["TIMMFACE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "timmface"
