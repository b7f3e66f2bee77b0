"""Build of lamina's optional C accelerator (everything else is declared in pyproject.toml).

``lamina.fs._native`` speeds up the apply engine's common case; without a C compiler the build goes on
without it and lamina runs its pure-Python path (``optional=True``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lamina.fs._native",
            ["core/fs/_native.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        )
    ]
)
