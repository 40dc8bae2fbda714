"""The HTTP edge: controllers, request/response bodies, and the request-level error vocabulary."""
