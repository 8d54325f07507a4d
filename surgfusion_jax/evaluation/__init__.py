"""Metrics, the results summary, tables, figures and the paper's own numbers."""
