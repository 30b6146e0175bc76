'use strict';
// The canonical form of a schema (docs/spec.md, sections 5 and 6): a tree of nodes
// {children, name, nullable, type} written as JSON with exactly those keys in that order.

const arrow = require('apache-arrow');
const { ByteBuffer, Encoding } = require('flatbuffers');
const { Message: FbMessage } = require('apache-arrow/fb/message');
const { MessageHeader } = require('apache-arrow/fb/message-header');
const { Schema: FbSchema } = require('apache-arrow/fb/schema');
const { Type, TimeUnit, DateUnit, Precision } = arrow;
const { UnsupportedData } = require('./errors');

const UNIT = { [TimeUnit.SECOND]: 's', [TimeUnit.MILLISECOND]: 'm',
  [TimeUnit.MICROSECOND]: 'u', [TimeUnit.NANOSECOND]: 'n' };
const UNIT_OF = { s: TimeUnit.SECOND, m: TimeUnit.MILLISECOND,
  u: TimeUnit.MICROSECOND, n: TimeUnit.NANOSECOND };
const INTS = { c: [true, 8], s: [true, 16], i: [true, 32], l: [true, 64],
  C: [false, 8], S: [false, 16], I: [false, 32], L: [false, 64] };
const FLOATS = { e: Precision.HALF, f: Precision.SINGLE, g: Precision.DOUBLE };
const DECIMAL_MAX_PRECISION = { 32: 9, 64: 18, 128: 38, 256: 76 };
const MAX_SIZE = 2147483647;

function node(name, nullable, type, children = []) {
  // Key order is the canonical order: JSON.stringify writes them as inserted.
  return { children, name, nullable, type };
}

function unsupported(what, path) {
  return new UnsupportedData(`column ${JSON.stringify(path)}: ${what} is not carried by ` +
    'deltaflush protocol 1 (docs/spec.md, section 5)');
}

function checkSize(n, path) {
  if (!Number.isInteger(n) || n < 1 || n > MAX_SIZE) throw unsupported(`a size of ${n}`, path);
  return n;
}

function checkDecimal(p, s, bits, path) {
  const max = DECIMAL_MAX_PRECISION[bits];
  if (!max || !Number.isInteger(p) || p < 1 || p > max || !Number.isInteger(s)) {
    throw unsupported(`decimal${bits}(${p}, ${s})`, path);
  }
}

function uniqueNames(nodes, path) {
  const seen = new Set();
  for (const n of nodes) {
    if (seen.has(n.name)) {
      throw new UnsupportedData(`duplicate column name ${JSON.stringify(n.name)}` +
        (path ? ` in ${JSON.stringify(path)}` : '') + ': names must be unique (section 6.2)');
    }
    seen.add(n.name);
  }
  return nodes;
}

/** The canonical node of one Arrow field, named `name` (default: the field's own name). */
function fieldNode(field, name = field.name, path = name) {
  if (typeof name !== 'string' || !name.isWellFormed()) {
    // JSON.stringify would write a lone surrogate as \udxxx, which no other language can
    // write: such a name is not Unicode text and has no canonical form (6.2).
    throw new UnsupportedData(`column ${JSON.stringify(path)}: its name holds a lone ` +
      'surrogate: a name must be Unicode text, valid UTF-8 (section 6.2)');
  }
  let type = field.type;
  if (type.typeId === Type.Dictionary) type = type.dictionary; // its value type
  const leaf = (format) => node(name, field.nullable, format);
  switch (type.typeId) {
    case Type.Null: return leaf('n');
    case Type.Bool: return leaf('b');
    case Type.Int: {
      const f = Object.keys(INTS).find((k) => INTS[k][0] === type.isSigned &&
        INTS[k][1] === type.bitWidth);
      if (!f) throw unsupported(String(type), path);
      return leaf(f);
    }
    case Type.Float: return leaf({ [Precision.HALF]: 'e', [Precision.SINGLE]: 'f',
      [Precision.DOUBLE]: 'g' }[type.precision]);
    case Type.Decimal: {
      const bits = type.bitWidth || 128;
      checkDecimal(type.precision, type.scale, bits, path);
      return leaf(`d:${type.precision},${type.scale}` + (bits === 128 ? '' : `,${bits}`));
    }
    case Type.Utf8: return leaf('u');
    case Type.LargeUtf8: return leaf('U');
    case Type.Binary: return leaf('z');
    case Type.LargeBinary: return leaf('Z');
    case Type.FixedSizeBinary: return leaf(`w:${checkSize(type.byteWidth, path)}`);
    case Type.Date: return leaf(type.unit === DateUnit.DAY ? 'tdD' : 'tdm');
    case Type.Time: return leaf(`tt${UNIT[type.unit]}`);
    case Type.Timestamp: return leaf(`ts${UNIT[type.unit]}:${type.timezone ?? ''}`);
    case Type.Duration: return leaf(`tD${UNIT[type.unit]}`);
    case Type.List: case Type.LargeList: case Type.FixedSizeList: {
      const format = type.typeId === Type.List ? '+l' : type.typeId === Type.LargeList ? '+L'
        : `+w:${checkSize(type.listSize, path)}`;
      return node(name, field.nullable, format, [fieldNode(type.children[0], 'item', `${path}.item`)]);
    }
    case Type.Struct:
      return node(name, field.nullable, '+s', uniqueNames(
        type.children.map((c) => fieldNode(c, c.name, `${path}.${c.name}`)), path));
    case Type.Map: {
      const [key, value] = type.children[0].type.children;
      const k = fieldNode(key, 'key', `${path}.key`);
      k.nullable = false;
      return node(name, field.nullable, '+m', [node('entries', false, '+s',
        [k, fieldNode(value, 'value', `${path}.value`)])]);
    }
    default:
      throw unsupported(String(type), path);
  }
}

/** The canonical nodes of an Arrow schema (fields in order, at least one, unique names). */
function schemaNodes(schema) {
  if (!schema || schema.fields.length === 0) {
    throw new UnsupportedData('a schema without columns is not a table schema (section 6.2)');
  }
  return uniqueNames(schema.fields.map((f) => fieldNode(f)), '');
}

/** The canonical text of nodes: JSON.stringify writes the escapes of section 6.2. */
function canonicalText(nodes) {
  return JSON.stringify(nodes.map(function norm(n) {
    return node(n.name, n.nullable, n.type, n.children.map(norm));
  }));
}

/** The canonical form of an Arrow schema, as a string (section 6). */
function canonicalSchema(schema) {
  return canonicalText(schemaNodes(schema));
}

// ---- From a canonical form back to Arrow (section 6.4) ----

/** The Arrow type of a format string with its children fields. */
function arrowType(format, children, path) {
  const kids = () => children.map((c) => arrowField(c, `${path}.${c.name}`));
  const one = () => {
    if (children.length !== 1) throw unsupported(`${format} with ${children.length} children`, path);
    return arrowField({ ...children[0], name: 'item' }, `${path}.item`);
  };
  const none = (t) => {
    if (children.length) throw unsupported(`${format} with children`, path);
    return t;
  };
  let m;
  if (format === 'n') return none(new arrow.Null());
  if (format === 'b') return none(new arrow.Bool());
  if (INTS[format]) return none(new arrow.Int(...INTS[format]));
  if (format in FLOATS) return none(new arrow.Float(FLOATS[format]));
  if (format === 'u') return none(new arrow.Utf8());
  if (format === 'U') return none(new arrow.LargeUtf8());
  if (format === 'z') return none(new arrow.Binary());
  if (format === 'Z') return none(new arrow.LargeBinary());
  if ((m = /^w:(\d+)$/.exec(format))) return none(new arrow.FixedSizeBinary(checkSize(+m[1], path)));
  if ((m = /^d:(\d+),(-?\d+)(?:,(32|64|256))?$/.exec(format))) {
    const bits = m[3] ? +m[3] : 128;
    checkDecimal(+m[1], +m[2], bits, path);
    return none(new arrow.Decimal(+m[2], +m[1], bits));
  }
  if (format === 'tdD') return none(new arrow.DateDay());
  if (format === 'tdm') return none(new arrow.DateMillisecond());
  if ((m = /^tt([smun])$/.exec(format))) {
    return none(new arrow.Time(UNIT_OF[m[1]], 'sm'.includes(m[1]) ? 32 : 64));
  }
  if ((m = /^ts([smun]):(.*)$/s.exec(format))) {
    return none(new arrow.Timestamp(UNIT_OF[m[1]], m[2] === '' ? null : m[2]));
  }
  if ((m = /^tD([smun])$/.exec(format))) return none(new arrow.Duration(UNIT_OF[m[1]]));
  if (format === '+l') return new arrow.List(one());
  if (format === '+L') return new arrow.LargeList(one());
  if ((m = /^\+w:(\d+)$/.exec(format))) return new arrow.FixedSizeList(checkSize(+m[1], path), one());
  if (format === '+s') return new arrow.Struct(kids());
  if (format === '+m') {
    const e = children[0];
    if (children.length !== 1 || e.type !== '+s' || e.children.length !== 2) {
      throw unsupported('a map without one entries struct of key and value', path);
    }
    const [k, v] = e.children;
    return new arrow.Map_(new arrow.Field('entries', new arrow.Struct([
      arrowField({ ...k, name: 'key', nullable: false }, `${path}.key`),
      arrowField({ ...v, name: 'value' }, `${path}.value`)]), false));
  }
  throw unsupported(`the type ${JSON.stringify(format)}`, path);
}

function arrowField(n, path = n.name) {
  return new arrow.Field(n.name, arrowType(n.type, n.children, path), n.nullable);
}

/** Checks that `value` (parsed JSON) has the structure of 6.2, in any key order. */
function checkStructure(value, where) {
  const bad = (what) => new UnsupportedData(`not a canonical schema: ${what} at ${where}`);
  if (!Array.isArray(value)) throw bad('not an array');
  for (const [i, f] of value.entries()) {
    const at = `${where}[${i}]`;
    if (f === null || typeof f !== 'object' || Array.isArray(f)) throw bad(`not an object ${at}`);
    if (typeof f.name !== 'string') throw bad(`no string "name" ${at}`);
    if (typeof f.nullable !== 'boolean') throw bad(`no boolean "nullable" ${at}`);
    if (typeof f.type !== 'string') throw bad(`no string "type" ${at}`);
    checkStructure(f.children, `${at}.children`);
  }
  return value;
}

/**
 * Reads a canonical form (a string or UTF-8 bytes), accepting any JSON of the structure of
 * 6.2 (6.4). Returns {schema: the Arrow schema, nodes: its canonical nodes, text: the
 * canonical text}; `text` may differ from the input when the input is not canonical.
 */
function parseCanonical(input) {
  const source = Buffer.isBuffer(input) || input instanceof Uint8Array
    ? Buffer.from(input).toString('utf8') : String(input);
  let value;
  try {
    value = JSON.parse(source);
  } catch (e) {
    throw new UnsupportedData(`not a canonical schema: invalid JSON (${e.message})`);
  }
  checkStructure(value, 'schema');
  const schema = new arrow.Schema(value.map((f) => arrowField(f)));
  const nodes = schemaNodes(schema);
  return { schema, nodes, text: canonicalText(nodes) };
}

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Throws UnsupportedData when a field name in the Schema message that starts `buf` is not
 * valid UTF-8 (6.2). arrow-js decodes names leniently, each invalid byte as U+FFFD, which
 * would give the schema a canonical form that no other language computes: the names are
 * read again here, as bytes, from the message's flatbuffer.
 */
function checkNameBytes(buf) {
  const at = buf.length >= 4 && buf.readInt32LE(0) === -1 ? 4 : 0; // continuation marker
  const length = buf.length >= at + 4 ? buf.readInt32LE(at) : 0;
  if (length <= 0 || at + 4 + length > buf.length) return;
  const message = FbMessage.getRootAsMessage(new ByteBuffer(
    new Uint8Array(buf.buffer, buf.byteOffset + at + 4, length)));
  if (message.headerType() !== MessageHeader.Schema) return;
  const walk = (count, fieldAt, path) => {
    for (let i = 0; i < count; i++) {
      const field = fieldAt(i);
      let name;
      try {
        name = UTF8.decode(field.name(Encoding.UTF8_BYTES) || new Uint8Array(0));
      } catch {
        throw new UnsupportedData(`field ${i} of ${path ? JSON.stringify(path) : 'the schema'} ` +
          'has a name that is not valid UTF-8: a name must be Unicode text (section 6.2)');
      }
      walk(field.childrenLength(), (j) => field.children(j), path ? `${path}.${name}` : name);
    }
  };
  const schema = message.header(new FbSchema());
  walk(schema.fieldsLength(), (i) => schema.fields(i), '');
}

/**
 * The Arrow schema of the Schema message at the start of an IPC stream (a payload, or a
 * stored schema from before protocol 1, section 11), or null when the bytes do not start
 * with one. Only that message is read (section 13): a payload cut after it still has one.
 * Throws UnsupportedData when a name in it is not valid UTF-8 (6.2).
 */
function readIpcSchema(bytes) {
  const buf = Buffer.from(bytes);
  // The IPC file format (ARROW1 magic) is not a payload (section 4), though arrow-js reads it.
  if (buf.subarray(0, 6).toString('latin1') === 'ARROW1') return null;
  let schema;
  try {
    const reader = arrow.RecordBatchStreamReader.from(buf);
    reader.open();
    schema = reader.schema || null;
  } catch {
    return null;
  }
  if (schema) checkNameBytes(buf);
  return schema;
}

module.exports = {
  canonicalSchema, canonicalText, schemaNodes, fieldNode, parseCanonical, arrowField,
  readIpcSchema, node,
};
