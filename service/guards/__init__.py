"""Guards on what the model reads and writes: the doom-loop detector and the injection tripwire. They depend on nothing but the schemas."""
