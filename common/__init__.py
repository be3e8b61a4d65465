"""What training and serving both use, and neither imports from the other: this package imports neither."""
