"""The HTTP face of the service: thin routes over the pipeline."""
