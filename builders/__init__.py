"""Network specs, the Inception module, GoogLeNet, and networks built from specs."""
