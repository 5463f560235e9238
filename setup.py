"""Kept for tools that still look for setup.py; all metadata is in pyproject.toml."""

from setuptools import setup

setup()
