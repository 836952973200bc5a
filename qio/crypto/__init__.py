"""Disk encryption (QEMU's ``crypto/``): ciphers with IV generators, LUKS1 headers, the legacy qcow AES.

The ``cryptography`` package does the block ciphers; it is imported only when an encrypted image is opened
or created, so start-up of plain images does not pay for it.
"""
