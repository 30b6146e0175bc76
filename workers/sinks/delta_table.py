"""Where a table's Delta table lives; the code is ``producer.delta_table`` (the producer's
reads open the table too, and ``producer`` never imports ``workers``). Kept so existing
imports work."""

from producer.delta_table import UNSAFE_RENAME as UNSAFE_RENAME
from producer.delta_table import Location as Location
from producer.delta_table import location as location
from producer.delta_table import panics_as_errors as panics_as_errors
from producer.delta_table import s3_options as s3_options
