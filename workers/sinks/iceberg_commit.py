"""One flush commit to an Iceberg table: an append snapshot and a table property, sent to the
catalog as one metadata commit, conditional on the branch the caller checked.

pyiceberg's ``Transaction`` would do the same, but it deep-copies the whole table metadata
at each of a dozen steps of building an append, and the metadata holds every snapshot: a
commit then costs time in proportion to the snapshots kept, 16 copies over (measured in
docs/performance.md). This builds the snapshot from pyiceberg's own parts (manifest and
manifest list writers, snapshot summaries) on the table as loaded, and hands the catalog
the same updates and requirements a ``Transaction`` would:

* updates: the properties, ``AddSnapshotUpdate``, ``SetSnapshotRefUpdate`` (main);
* requirements: ``AssertTableUUID`` and ``AssertRefSnapshotId(main, <the loaded snapshot>)``,
  so that any commit in between makes this one fail with ``CommitFailedException``
  (the catalog checks and compare-and-sets), and the caller looks at the table again.

Like ``Table`` after a commit, it then deletes the metadata files that fell out of the
metadata log (``write.metadata.delete-after-commit.enabled``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

MAIN = "main"


def append(table: Table, files: list[DataFile], properties: dict[str, str],
           snapshot_properties: dict[str, str]) -> tuple[int, Any]:
    """Commit ``files`` as one append snapshot with ``snapshot_properties`` in its summary,
    and set ``properties``, on the snapshot ``table`` was loaded at. Returns the new
    snapshot's ID and the new metadata. Raises ``CommitFailedException`` if the table's
    main branch moved meanwhile (nothing landed then)."""
    from pyiceberg.catalog import delete_files
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.manifest import (
        ManifestEntry,
        ManifestEntryStatus,
        write_manifest,
        write_manifest_list,
    )
    from pyiceberg.table import TableProperties
    from pyiceberg.table.refs import SnapshotRefType
    from pyiceberg.table.snapshots import (
        Operation,
        Snapshot,
        SnapshotSummaryCollector,
        Summary,
        update_snapshot_summaries,
    )
    from pyiceberg.table.update import (
        AddSnapshotUpdate,
        AssertRefSnapshotId,
        AssertTableUUID,
        SetPropertiesUpdate,
        SetSnapshotRefUpdate,
    )

    metadata = table.metadata
    io = table.io
    schema = metadata.schema()
    specs = metadata.specs()
    parent = metadata.snapshot_by_name(MAIN)
    snapshot_id = metadata.new_snapshot_id()
    sequence_number = metadata.next_sequence_number()
    compression = metadata.properties.get(TableProperties.WRITE_AVRO_COMPRESSION,
                                          TableProperties.WRITE_AVRO_COMPRESSION_DEFAULT)
    locations = table.location_provider()
    commit_uuid = uuid.uuid4()

    manifests = []
    specs_used = sorted({f.spec_id for f in files})
    for number, spec_id in enumerate(specs_used):
        path = locations.new_metadata_location(f"{commit_uuid}-m{number}.avro")
        with write_manifest(format_version=metadata.format_version, spec=specs[spec_id],
                            schema=schema, output_file=io.new_output(path),
                            snapshot_id=snapshot_id,
                            avro_compression=compression) as writer:  # type: ignore[arg-type]
            for f in files:
                if f.spec_id == spec_id:
                    writer.add(ManifestEntry.from_args(
                        status=ManifestEntryStatus.ADDED, snapshot_id=snapshot_id,
                        sequence_number=None, file_sequence_number=None, data_file=f))
        manifests.append(writer.to_manifest_file())
    if parent is not None:
        manifests.extend(m for m in parent.manifests(io)
                         if m.has_added_files() or m.has_existing_files())

    list_path = locations.new_metadata_location(
        f"snap-{snapshot_id}-0-{commit_uuid}.avro")
    with write_manifest_list(format_version=metadata.format_version,
                             output_file=io.new_output(list_path), snapshot_id=snapshot_id,
                             parent_snapshot_id=parent.snapshot_id if parent else None,
                             sequence_number=sequence_number,
                             avro_compression=compression) as lister:  # type: ignore[arg-type]
        lister.add_manifests(manifests)

    collector = SnapshotSummaryCollector()
    for f in files:
        collector.add_file(f, partition_spec=specs[f.spec_id], schema=schema)
    summary = update_snapshot_summaries(
        Summary(Operation.APPEND, **collector.build(), **snapshot_properties),
        parent.summary if parent is not None else None)
    parent_id = parent.snapshot_id if parent else None
    # (pydantic models: fields by name, which pyiceberg's own code uses too)
    snapshot = Snapshot(**cast(dict[str, Any], dict(
        snapshot_id=snapshot_id, parent_snapshot_id=parent_id,
        sequence_number=sequence_number, manifest_list=list_path, summary=summary,
        schema_id=metadata.current_schema_id)))
    updates = (SetPropertiesUpdate(updates=properties), AddSnapshotUpdate(snapshot=snapshot),
               SetSnapshotRefUpdate(**cast(dict[str, Any], dict(
                   snapshot_id=snapshot_id, parent_snapshot_id=parent_id, ref_name=MAIN,
                   type=SnapshotRefType.BRANCH))))
    requirements = (AssertTableUUID(uuid=metadata.table_uuid),
                    AssertRefSnapshotId(**cast(dict[str, Any], dict(snapshot_id=parent_id,
                                                                     ref=MAIN))))
    try:
        response = table.catalog.commit_table(table, requirements, updates)
    except CommitFailedException:  # did not land: what was written for it is nobody's
        delete_files(io, {m.manifest_path for m in manifests[:len(specs_used)]} | {list_path},
                     "manifest")
        raise
    if response.metadata.properties.get(
            TableProperties.METADATA_DELETE_AFTER_COMMIT_ENABLED, "false") == "true":
        gone = {e.metadata_file for e in metadata.metadata_log} - {
            e.metadata_file for e in response.metadata.metadata_log}
        delete_files(io, gone, "metadata")
    return snapshot_id, response.metadata
