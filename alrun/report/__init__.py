"""``alrun-report``: gather runs, compare strategies over seeds, write HTML/PNG/CSV."""
