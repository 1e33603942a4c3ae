"""Build the compiled core.

Every ``src/fastpool/_*.pyx`` becomes an extension module.  A build without
Cython or without a C compiler fails: fastpool has no pure-Python fallback, so a
wheel without its compiled core would be a broken wheel, not a slow one.
"""

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    # The worker loop is written against epoll, accept4, sendfile and
    # PR_SET_PDEATHSIG; say so at build time rather than at first request.
    sys.exit(f"fastpool supports Linux only (this is {sys.platform!r}); see README.md")

SRC = Path("src/fastpool")

extensions = [
    Extension(
        f"fastpool.{pyx.stem}",
        [str(pyx)],
        extra_compile_args=["-O2"],
    )
    for pyx in sorted(SRC.glob("_*.pyx"))
]
if not extensions:
    # An sdist or checkout without the .pyx sources would otherwise build a
    # pure-Python wheel that installs fine and cannot serve.
    sys.exit(f"no {SRC}/_*.pyx found: the compiled core's sources are missing")

setup(
    # One compiler per CPU for the extension modules (they are independent).
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
    ext_modules=cythonize(
        extensions,
        nthreads=os.cpu_count() or 1,
        compiler_directives={
            "language_level": "3",
            # Indexing is checked: an index past the end (or a negative one,
            # with wraparound off) raises IndexError -- a 500 or a closed
            # connection -- instead of reading stray memory.  The checks cost
            # a compare per list or tuple index; the hot loops index C arrays.
            "boundscheck": True,
            "wraparound": False,  # so a negative index is an IndexError, never x[len(x) - n]
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
