"""The `gatekeeper` console command: serve, ops commands."""
