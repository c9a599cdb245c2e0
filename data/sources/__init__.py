"""Record sources: each module turns a task collection into chat records."""
