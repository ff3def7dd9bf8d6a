"""Real annotators in the loop (``oracle=human``): export a round's selection to annotation
tools, import their labels and seconds, and calibrate the cost model on those seconds."""
