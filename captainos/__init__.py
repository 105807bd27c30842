"""CaptainOS build tool."""

__version__ = "0.1.0"
