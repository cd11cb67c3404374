"""The version of wrapcal, in one place the lower layers can import without the public API."""

__version__ = "0.3.0"
