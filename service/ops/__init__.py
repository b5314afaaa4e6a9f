"""What operators run it with: audit log, API keys, drain, Prometheus metrics, logs, model weights."""
