"""Session fixtures for the analyze tests (imported by conftest.py)."""
