"""Tar streams: decompression and verification, header decoding, the tar-split record of exact exports."""
