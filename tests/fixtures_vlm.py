"""Session fixtures for the vlm tests (imported by conftest.py)."""
