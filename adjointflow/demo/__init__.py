"""The demo: a small flow-matching model on scikit-learn's bundled 8x8 digits (see `digits`)."""
