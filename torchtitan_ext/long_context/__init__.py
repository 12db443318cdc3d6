"""Long context per device: memory features that let one device train longer sequences
(chunked cross-entropy, ...), applied by ``parallelize`` and the loss, never by editing the
model's code."""
