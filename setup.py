# A shim for tools that still call setup.py; pyproject.toml is the source of truth for the package metadata.
from setuptools import setup


setup()
