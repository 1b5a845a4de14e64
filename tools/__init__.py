"""Command-line tools of slimengine (besides export-engine, which lives with the exporter)."""
