"""Turn (layer signature, precision) into measurement jobs and run them on a target into a LUT (resumable)."""
