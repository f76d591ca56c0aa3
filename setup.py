"""Build entry. The package is pure Python + Triton for now; the CUDA extension in csrc/ plugs in here."""

from setuptools import setup

setup()
