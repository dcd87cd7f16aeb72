"""The SQL registry: models (``models``) and, as they land, query functions per resource."""
