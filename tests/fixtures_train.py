"""Session fixtures for the train tests (imported by conftest.py)."""
