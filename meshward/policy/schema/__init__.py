"""One schema module per document kind, over the generic shapes in base."""
