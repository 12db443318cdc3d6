"""One module per parallelism; ``torchtitan_ext.parallelize`` applies them in order."""
