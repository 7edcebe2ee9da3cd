"""Build script. Metadata lives in pyproject.toml.

The native module ``aim_kernels._C`` (csrc/ + python/, built with CMake) is added by
the native-kernels work; until then this installs the pure-Python package, which
works on any machine: the ``torch`` backend needs no compiler and no GPU.
"""
from setuptools import setup

setup()
