"""Demo model: synthetic phantoms, its training and evaluation scripts."""
