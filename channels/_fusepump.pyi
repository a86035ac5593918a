"""The native pump ``channels._fusepump``, a C extension built in place from
channels/native/fusepump.c (when a compiler is there). mypy reads no .so: this stub says only
that the module exists; its names are Any (channels/pumps.py hands it out as a ModuleType).
"""

from typing import Any

def __getattr__(name: str) -> Any: ...
