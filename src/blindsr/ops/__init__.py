"""Small shared operations: tiling (one module for every tiler), resizing/padding, colour fix, precision."""
