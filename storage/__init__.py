"""Persistence: what the server stores on disk and reads back."""
