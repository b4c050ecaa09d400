"""Build entry point.

All metadata lives in pyproject.toml. This file exists so that the optional
native extension under csrc/ can be added to the build here.
"""

from setuptools import setup

setup()
