"""Small process-level utilities."""
