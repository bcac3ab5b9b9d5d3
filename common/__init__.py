"""Pieces shared by broker and peer: wire format, crypto recipes, identity, config, errors."""
