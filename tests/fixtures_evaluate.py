"""Session fixtures for the evaluate tests (imported by conftest.py)."""
