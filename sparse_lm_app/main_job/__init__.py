"""The main job (``make demo``): stages from the embedded corpus to the report; see `pipeline`."""
