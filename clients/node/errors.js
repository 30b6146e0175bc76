'use strict';
// The producer's errors (docs/spec.md, sections 7.4, 8, 10, 11). `retryable` says whether
// sending the same batch later may succeed; the caller's errors (bad name, bad data, a
// schema conflict) are not retryable.

class DeltaflushError extends Error {
  constructor(message, { retryable = false } = {}) {
    super(message);
    this.name = this.constructor.name;
    this.retryable = retryable;
  }
}

/** A table name that does not match ^[A-Za-z][A-Za-z0-9_]{0,127}$ (section 2). */
class InvalidTableName extends DeltaflushError {}

/** Data deltaflush does not carry: a type of no section 5 format, duplicate names, 0 rows... */
class UnsupportedData extends DeltaflushError {}

/** A payload over the 64 MiB a producer should not exceed (section 4). */
class BatchTooLarge extends DeltaflushError {}

/** The batch does not fit the table's schema (section 8); `column` names the column. */
class SchemaConflict extends DeltaflushError {
  constructor(message, column = null) {
    super(message);
    this.column = column;
  }
}

/** The table's schema kept changing: 4 CONFLICT replies for one batch (section 8). */
class SchemaRace extends DeltaflushError {
  constructor(message) { super(message, { retryable: true }); }
}

/** BACKPRESSURE (7.6): the table has too much unflushed data. */
class Backpressure extends DeltaflushError {
  constructor(message, pendingBytes) {
    super(message, { retryable: true });
    this.pendingBytes = pendingBytes;
  }
}

/** NO_MEMORY (7.4): Redis refused a write for lack of memory. */
class OutOfMemory extends DeltaflushError {
  constructor(message) { super(message, { retryable: true }); }
}

/** PROTOCOL (section 10): the table requires a later protocol; never retried. */
class UpgradeRequired extends DeltaflushError {
  constructor(required) {
    super(`the table requires deltaflush protocol ${required}; this producer speaks protocol 1: ` +
      'upgrade the producer');
    this.required = required;
  }
}

/** A table whose stored schema this producer cannot read (section 11, or a broken value). */
class UnreadableTableSchema extends DeltaflushError {}

/** The append check script loaded is not protocol 1's: its digest differs (7.2). */
class WrongCheckScript extends DeltaflushError {}

module.exports = {
  DeltaflushError, InvalidTableName, UnsupportedData, BatchTooLarge, SchemaConflict,
  SchemaRace, Backpressure, OutOfMemory, UpgradeRequired, UnreadableTableSchema,
  WrongCheckScript,
};
