"""sparse_coding: take features out of superposition with sparse autoencoders."""
