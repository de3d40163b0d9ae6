"""Test helpers: fixtures and builders shared by test modules."""
