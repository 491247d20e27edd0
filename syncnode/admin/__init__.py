"""The admin side of a node: HTTP API, OpenAPI document, dashboard, metrics."""
