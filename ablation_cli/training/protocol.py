"""Version of the training protocol; part of every checkpoint fingerprint.

Bump it whenever a change to the trainer or metrics changes the numbers.
"""

PROTOCOL_VERSION = 1
