"""Planted structure: activations generated from a known sparse network (`generator`), and each
constructed layer's clusters scored against its truth (`recovery`)."""
