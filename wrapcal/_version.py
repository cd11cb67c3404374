"""The version of wrapcal, in one place the lower layers can import without the public API.

This is the only place the version is written: pyproject.toml reads it
(``dynamic = ["version"]``, ``[tool.setuptools.dynamic]``), so the built distribution's
metadata and ``wrapcal.__version__`` cannot differ (tests/test_wheel.py checks both).
"""

__version__ = "0.3.0"
