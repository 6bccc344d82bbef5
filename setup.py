"""Build the compiled frame core; all metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fcvsock._cframes",
        ["src/fcvsock/_cframes.pyx"],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        # Cython looks for the .pxd by the module's full name, fcvsock._cframes.
        include_path=["src"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    )
)
