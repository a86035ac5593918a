"""The native data-path pumps: every ``channels/native/<name>.c`` builds the CPython extension
``channels._<name>`` (issue 13's batch pumps; everything else is Python).

pyproject.toml holds the project's metadata; this file only adds the extensions, which
``pip install -e .`` builds in place. ``scripts/setup.sh`` rebuilds them (``build_ext
--inplace``) when a source is newer than its module. A pump's Python reference runs whenever its
module is missing (``channels.native.available``), so a host without a C compiler still works.
"""

from pathlib import Path

from setuptools import Extension, setup

NATIVE = Path("channels/native")
FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"]


def extensions() -> list[Extension]:
    return [
        Extension(
            f"channels._{source.stem}",
            [str(source)],
            depends=[str(header) for header in NATIVE.glob("*.h")],
            extra_compile_args=FLAGS,
        )
        for source in sorted(NATIVE.glob("*.c"))
    ]


setup(ext_modules=extensions())
