"""megaclass.pipelines."""
