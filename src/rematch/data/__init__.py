"""Data: items, image loading, the built-in shapes world, MMEB readers."""
