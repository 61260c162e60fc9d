"""Reading environment variables on the path of every call.

``os.environ.get`` of a variable that is not set costs about 0.7 µs (the key is encoded and a KeyError
raised and caught); ``auto`` dispatch reads two variables per call. :func:`get` reads the same mapping
that ``os.environ`` keeps (so it sees every change made through ``os.environ``) with the key encoded once.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

_environ = os.environ
_data = getattr(_environ, "_data", None)  # CPython's os.environ keeps its items here, keys encoded
_encodekey = getattr(_environ, "encodekey", None)
_decodevalue = getattr(_environ, "decodevalue", None)
_keys: Dict[str, object] = {}


def get(name: str) -> Optional[str]:
    """``os.environ.get(name)``."""
    if os.environ is not _environ or _data is None or _encodekey is None or _decodevalue is None:
        return os.environ.get(name)  # os.environ replaced (a test's mapping), or not CPython's: the plain way
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _encodekey(name)
    raw = _data.get(key)
    return None if raw is None else _decodevalue(raw)
