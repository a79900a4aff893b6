"""megaclass.data."""
