"""The Iceberg catalog; the code is ``producer.catalog`` (the producer's reads load tables
from it too, and ``producer`` never imports ``workers``). Kept so existing imports work."""

from producer.catalog import CATALOG_NAME as CATALOG_NAME
from producer.catalog import OWN_FOLDER as OWN_FOLDER
from producer.catalog import catalog_uri as catalog_uri
from producer.catalog import file_io_properties as file_io_properties
from producer.catalog import identifier as identifier
from producer.catalog import load as load
from producer.catalog import namespace as namespace
from producer.catalog import storage_location as storage_location
