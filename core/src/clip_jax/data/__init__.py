"""Input pipeline: data sources, the embedded synthetic dataset, tokenizers, tf.data."""
