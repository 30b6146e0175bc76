'use strict';
// Shaping a batch to a table's schema (docs/spec.md, section 8): the target schema, the
// "widens to" relation, and conforming Arrow data to the target. Also builds Arrow columns
// from plain JS values (rows), exactly: arrow-js builders scale temporal values from
// milliseconds, so columns are made from typed arrays here.

const arrow = require('apache-arrow');
const { Type } = arrow;
const { canonicalText, schemaNodes, arrowField, node } = require('./canonical');
const { SchemaConflict, UnsupportedData } = require('./errors');

// ---- Widening (8.2), on canonical nodes ----

const INT_BITS = { c: [true, 8], s: [true, 16], i: [true, 32], l: [true, 64],
  C: [false, 8], S: [false, 16], I: [false, 32], L: [false, 64] };
const FLOAT_BITS = { e: 16, f: 32, g: 64 };

/** A node's type with its children (names and nullability inside), not its own name. */
function typeKey(n) {
  return canonicalText([node('', true, n.type, n.children)]);
}

/** Whether a column of node `from`'s type converts losslessly to node `to`'s type. */
function widens(from, to) {
  if (typeKey(from) === typeKey(to)) return true;
  if (from.type === 'n') return true;
  const a = INT_BITS[from.type];
  const b = INT_BITS[to.type];
  if (a && b) {
    const [aSigned, aBits] = a;
    const [bSigned, bBits] = b;
    if (aSigned) return bSigned && bBits >= aBits;
    return bSigned ? bBits > aBits : bBits >= aBits;
  }
  const fa = FLOAT_BITS[from.type];
  const fb = FLOAT_BITS[to.type];
  if (a && fb) return fb > a[1];
  if (fa && fb) return fb >= fa;
  return (from.type === 'u' && to.type === 'U') || (from.type === 'z' && to.type === 'Z');
}

function conflict(column, tableType, batchType) {
  return new SchemaConflict(`schema conflict on column ${JSON.stringify(column)}: the table ` +
    `has ${tableType}, the batch has ${batchType} (docs/spec.md, section 8)`, column);
}

/** The target nodes of a batch for a table's nodes (8.1); throws SchemaConflict. */
function targetNodes(tableNodes, batchNodes) {
  const batch = new Map(batchNodes.map((b) => [b.name, b]));
  const target = [];
  for (const t of tableNodes) {
    const b = batch.get(t.name);
    if (!b) {
      if (!t.nullable) throw conflict(t.name, `${t.type} not null`, 'no such column');
      target.push(t);
    } else if (widens(b, t)) {
      target.push(t);
    } else if (widens(t, b)) {
      target.push(node(t.name, t.nullable, b.type, b.children));
    } else {
      throw conflict(t.name, t.type, b.type);
    }
  }
  const names = new Set(tableNodes.map((t) => t.name));
  for (const b of batchNodes) {
    if (!names.has(b.name)) target.push(node(b.name, true, b.type, b.children));
  }
  return target;
}

// ---- Arrow columns from JS values ----

function bitmap(values) {
  const bits = new Uint8Array((values.length + 7) >> 3);
  let nulls = 0;
  values.forEach((v, i) => {
    if (v === null || v === undefined) nulls++;
    else bits[i >> 3] |= 1 << (i & 7);
  });
  return { nullBitmap: nulls ? bits : new Uint8Array(0), nullCount: nulls };
}

function bad(type, v, path) {
  return new UnsupportedData(`column ${JSON.stringify(path)}: ${JSON.stringify(typeof v ===
    'bigint' ? String(v) : v)} is not a value of type ${type}`);
}

function integer(v, type, path) {
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number' && Number.isInteger(v)) return BigInt(v);
  throw bad(type, v, path);
}

/** The number or bigint to store in a fixed-width slot of `type` for the value `v`. */
function slotValue(type, v, path) {
  const big = type.ArrayType === BigInt64Array || type.ArrayType === BigUint64Array;
  switch (type.typeId) {
    case Type.Int: {
      const i = integer(v, type, path);
      const bits = BigInt(type.bitWidth);
      const [lo, hi] = type.isSigned ? [-(1n << (bits - 1n)), (1n << (bits - 1n)) - 1n]
        : [0n, (1n << bits) - 1n];
      if (i < lo || i > hi) throw bad(type, v, path);
      return big ? i : Number(i);
    }
    case Type.Float: {
      if (typeof v !== 'number' && typeof v !== 'bigint') throw bad(type, v, path);
      return type.precision === arrow.Precision.HALF ? arrow.util.float64ToUint16(Number(v))
        : Number(v);
    }
    case Type.Date: case Type.Time: case Type.Timestamp: case Type.Duration: {
      const i = integer(v, type, path);
      return big ? BigInt.asIntN(64, i) : Number(BigInt.asIntN(32, i));
    }
    default:
      throw bad(type, v, path);
  }
}

function bytesOf(v, type, path) {
  if (v instanceof Uint8Array) return v;
  if (typeof v === 'string') return Buffer.from(v, 'utf8');
  throw bad(type, v, path);
}

/** The offsets and child values of list-like values (lists, binary, maps). */
function offsetsOf(values, large, lengthOf) {
  const offsets = large ? new BigInt64Array(values.length + 1) : new Int32Array(values.length + 1);
  let at = 0;
  values.forEach((v, i) => {
    if (v !== null && v !== undefined) at += lengthOf(v);
    offsets[i + 1] = large ? BigInt(at) : at;
  });
  if (!large && at > 0x7fffffff) throw new UnsupportedData('a column over 2 GiB: use a large type');
  return offsets;
}

/** Arrow Data of `type` holding `values` (null or undefined: a null), exactly. */
function buildData(type, values, path = '') {
  const n = values.length;
  const { nullBitmap, nullCount } = bitmap(values);
  const base = { type, length: n, nullCount, nullBitmap };
  switch (type.typeId) {
    case Type.Null:
      if (nullCount !== n) throw bad(type, values.find((v) => v != null), path);
      return arrow.makeData({ type, length: n });
    case Type.Bool: {
      const data = new Uint8Array((n + 7) >> 3);
      values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        if (typeof v !== 'boolean') throw bad(type, v, path);
        if (v) data[i >> 3] |= 1 << (i & 7);
      });
      return arrow.makeData({ ...base, data });
    }
    case Type.Int: case Type.Float: case Type.Date: case Type.Time: case Type.Timestamp:
    case Type.Duration: {
      const data = new type.ArrayType(n);
      values.forEach((v, i) => { if (v !== null && v !== undefined) data[i] = slotValue(type, v, path); });
      return arrow.makeData({ ...base, data });
    }
    case Type.Decimal: {
      const words = type.bitWidth / 32;
      const data = new Uint32Array(n * words);
      values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        // The unscaled integer: 12345 is 123.45 in a decimal of scale 2.
        let x = BigInt.asUintN(type.bitWidth, integer(v, `${type} (unscaled)`, path));
        for (let w = 0; w < words; w++, x >>= 32n) data[i * words + w] = Number(x & 0xffffffffn);
      });
      return arrow.makeData({ ...base, data });
    }
    case Type.FixedSizeBinary: {
      const data = new Uint8Array(n * type.byteWidth);
      values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        const b = bytesOf(v, type, path);
        if (b.length !== type.byteWidth) throw bad(type, v, path);
        data.set(b, i * type.byteWidth);
      });
      return arrow.makeData({ ...base, data });
    }
    case Type.Utf8: case Type.LargeUtf8: case Type.Binary: case Type.LargeBinary: {
      const text = type.typeId === Type.Utf8 || type.typeId === Type.LargeUtf8;
      const bytes = values.map((v) => {
        if (v === null || v === undefined) return null;
        if (text && typeof v !== 'string') throw bad(type, v, path);
        return bytesOf(v, type, path);
      });
      const large = type.typeId === Type.LargeUtf8 || type.typeId === Type.LargeBinary;
      const valueOffsets = offsetsOf(bytes, large, (b) => b.length);
      return arrow.makeData({ ...base, valueOffsets, data: Buffer.concat(bytes.filter(Boolean)) });
    }
    case Type.List: case Type.LargeList: {
      values.forEach((v) => { if (v != null && !Array.isArray(v)) throw bad(type, v, path); });
      const valueOffsets = offsetsOf(values, type.typeId === Type.LargeList, (v) => v.length);
      const child = buildData(type.children[0].type, values.filter((v) => v != null).flat(),
        `${path}.item`);
      return arrow.makeData({ ...base, valueOffsets, child });
    }
    case Type.FixedSizeList: {
      const size = type.listSize;
      const flat = values.flatMap((v) => {
        if (v === null || v === undefined) return new Array(size).fill(null);
        if (!Array.isArray(v) || v.length !== size) throw bad(type, v, path);
        return v;
      });
      return arrow.makeData({ ...base, child: buildData(type.children[0].type, flat, `${path}.item`) });
    }
    case Type.Struct: {
      values.forEach((v) => {
        if (v != null && (typeof v !== 'object' || Array.isArray(v))) throw bad(type, v, path);
      });
      const children = type.children.map((f) => buildData(f.type,
        values.map((v) => (v == null ? null : v[f.name])), `${path}.${f.name}`));
      return arrow.makeData({ ...base, children });
    }
    case Type.Map: {
      // A JSON object, a Map, or an array of [key, value] pairs.
      const pairs = values.map((v) => {
        if (v === null || v === undefined) return null;
        if (v instanceof Map) return [...v.entries()];
        if (Array.isArray(v)) return v;
        if (typeof v === 'object') return Object.entries(v);
        throw bad(type, v, path);
      });
      const valueOffsets = offsetsOf(pairs, false, (p) => p.length);
      const entries = type.children[0].type;
      const flat = pairs.filter(Boolean).flat().map(([key, value]) => ({ key, value }));
      const child = arrow.makeData({ type: entries, length: flat.length, nullCount: 0,
        nullBitmap: new Uint8Array(0),
        children: entries.children.map((f) => buildData(f.type, flat.map((e) => e[f.name]),
          `${path}.${f.name}`)) });
      return arrow.makeData({ ...base, valueOffsets, child });
    }
    default:
      throw new UnsupportedData(`column ${JSON.stringify(path)}: cannot build a ${type} column`);
  }
}

/** An Arrow record batch from Arrow fields and one Data per field. */
function makeBatch(fields, datas, length) {
  const schema = new arrow.Schema(fields);
  const data = arrow.makeData({ type: new arrow.Struct(fields), length, nullCount: 0,
    nullBitmap: new Uint8Array(0), children: datas });
  return new arrow.RecordBatch(schema, data);
}

/**
 * A one-batch Arrow table of `rows` (an array of objects keyed by field name; a missing key
 * or null is a null) with the given Arrow schema. Values are those of docs/spec.md,
 * Appendix A: numbers for integers and floats (bigints too), integers in the type's unit for
 * dates, times, timestamps and durations, strings, booleans, arrays, objects.
 */
function rowsToTable(rows, schema) {
  if (!Array.isArray(rows)) throw new UnsupportedData('rows must be an array of objects');
  rows.forEach((r, i) => {
    if (r === null || typeof r !== 'object' || Array.isArray(r)) {
      throw new UnsupportedData(`row ${i} is not an object`);
    }
  });
  const datas = schema.fields.map((f) => {
    const data = buildData(f.type, rows.map((r) => r[f.name]), f.name);
    if (!f.nullable && data.nullCount > 0) {
      throw new UnsupportedData(`column ${JSON.stringify(f.name)} is not nullable and has nulls`);
    }
    return data;
  });
  return new arrow.Table([makeBatch(schema.fields, datas, rows.length)]);
}

// ---- Conforming (8.3) ----

/** The values of a vector as JS values (dictionaries decoded, 64-bit integers as bigints). */
function valuesOf(vector) {
  const out = new Array(vector.length);
  for (let i = 0; i < vector.length; i++) out[i] = vector.isValid(i) ? vector.get(i) : null;
  return out;
}

/**
 * The table conformed to the target nodes (8.3): columns in the target's order, missing
 * (nullable) columns as nulls, each column cast to the target's type, the target's
 * nullability. Columns already of the target's canonical type keep their data (a
 * dictionary stays one). Throws SchemaConflict for nulls in a non-nullable target column.
 */
function conform(table, target) {
  const batchNodes = schemaNodes(table.schema);
  const byName = new Map(batchNodes.map((n, i) => [n.name, i]));
  const batches = table.batches.map((batch) => {
    const fields = [];
    const datas = target.map((t) => {
      const i = byName.get(t.name);
      if (i === undefined) {
        const f = arrowField(t);
        fields.push(f);
        return buildData(f.type, new Array(batch.numRows).fill(null), t.name);
      }
      const vector = batch.getChildAt(i);
      if (!t.nullable && vector.nullCount > 0) {
        throw conflict(t.name, `${t.type} not null`, `${batchNodes[i].type} with nulls`);
      }
      if (typeKey(batchNodes[i]) === typeKey(t)) {
        fields.push(new arrow.Field(t.name, batch.schema.fields[i].type, t.nullable));
        return vector.data[0];
      }
      const f = arrowField(t);
      fields.push(f);
      return buildData(f.type, valuesOf(vector), t.name);
    });
    return makeBatch(fields, datas, batch.numRows);
  });
  return new arrow.Table(batches);
}

module.exports = { widens, typeKey, targetNodes, conform, buildData, rowsToTable, makeBatch };
