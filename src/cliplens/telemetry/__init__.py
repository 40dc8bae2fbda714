"""Tracing set-up, the metric families (the public contract), stage timing and JSON logging."""
