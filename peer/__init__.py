"""The sfs peer: identity, sharing, serving files and downloading them from other peers."""
