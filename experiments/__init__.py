"""Experiments built on diffunet, kept out of the installed package: they use only its public names."""
