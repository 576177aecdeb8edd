"""Alard–Lupton difference imaging: kernel basis, kernel fit, convolution, decorrelation, dipoles."""
