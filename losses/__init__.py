"""Pure loss functions of arrays and masks; each returns (loss, metrics)."""
