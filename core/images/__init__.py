"""Image operations: lookup, listing, names, deletion, inspection, history, import, commit, squash, load and save."""
