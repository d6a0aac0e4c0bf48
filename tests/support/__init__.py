"""Test support code: models and fixtures shared by unit and end-to-end tests (not shipped)."""
