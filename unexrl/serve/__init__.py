"""Serving: the request path, session state and metrics of the BentoML service (serving/)."""
