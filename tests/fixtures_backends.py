"""Session fixtures for the backends tests (imported by conftest.py)."""
