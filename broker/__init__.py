"""The sfs index broker: users, key bundles, signed manifests, presence and search."""
