"""Builds pdx's one native extension, the strided copy behind CPU pack/unpack.

Metadata lives in pyproject.toml; this file only adds the extension. It is optional: where
no C compiler is found the install still succeeds and pdx.kernels uses its torch path.
The source's hash is compiled in, so pdx.kernels.native can refuse a stale binary.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "pdx/kernels/_strided.c"
digest = hashlib.sha256(Path(__file__).with_name("pdx").joinpath("kernels", "_strided.c").read_bytes()).hexdigest()[:16]

setup(
    ext_modules=[
        Extension(
            "pdx.kernels._strided",
            sources=[SOURCE],
            define_macros=[("PDX_SOURCE_HASH", f'"{digest}"')],
            extra_compile_args=["-O3", "-std=c11"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
)
