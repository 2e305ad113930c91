"""Recursive refinement add-on: sidecar components, chunked generation and metrics."""
