"""Example apps bundled so that ``fastpool serve`` has something to serve."""
