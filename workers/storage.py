"""Shared storage; the code is ``producer.storage`` (the producer's reads list a table's
files too, and ``producer`` never imports ``workers``). Kept so existing imports work."""

from producer.storage import TMP_DIR as TMP_DIR
from producer.storage import Storage as Storage
from producer.storage import StoredFile as StoredFile
