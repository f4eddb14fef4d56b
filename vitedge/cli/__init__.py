"""The ``vitedge`` command: a thin click layer over the Python API.

Each sub-command lives in its own module and only parses options, calls the API and prints.
"""

from .main import main

__all__ = ["main"]
