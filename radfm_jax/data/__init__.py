"""Data: readers -> store (TensorStore zarr3 + manifest) -> Grain pipeline."""
