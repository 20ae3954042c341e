"""Observability shared by the frontend and the workers (docs/operations.md).

- `logs`: request ids (``X-Request-Id``) carried in context variables, a logging
  filter that stamps them on every record, text and JSON-lines formats.
- `tracing`: optional OpenTelemetry spans across processes (W3C trace context on
  the request plane); off by default at the cost of a few `None` checks.
- `spanfile`: a span exporter that writes one JSON object per line.
"""
