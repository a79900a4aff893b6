"""megaclass.clustering."""
