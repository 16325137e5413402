"""Session fixtures for the data tests (imported by conftest.py)."""
