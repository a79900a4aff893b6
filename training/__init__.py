"""megaclass.training."""
