"""Data: TFDS sources read without TensorFlow, the embedded digits, toy sets, and the batch iterator."""
