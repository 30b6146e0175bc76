'use strict';
// The canonical form against docs/spec.md (6.3, byte for byte) and spec/vectors (section 13),
// and what a producer can check of each vector by itself: its canonical form, and how
// shaping (section 8) treats it against the table it is appended to. No Redis needed.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const arrow = require('apache-arrow');
const { canonicalSchema, parseCanonical, readIpcSchema, schemaNodes, canonicalText } =
  require('../canonical');
const { widens, targetNodes, conform, rowsToTable } = require('../shape');
const errors = require('../errors');
const { SchemaConflict, UnsupportedData } = errors;
const { parseJsonExact, failure, EXIT } = require('../cli');

const ROOT = path.join(__dirname, '..', '..', '..');
const VECTORS = path.join(ROOT, 'spec', 'vectors');
const manifest = JSON.parse(fs.readFileSync(path.join(VECTORS, 'manifest.json'), 'utf8'));
const F = (name, type, nullable = true) => new arrow.Field(name, type, nullable);
const schemaOf = (...fields) => new arrow.Schema(fields);

test('6.3 worked examples, byte for byte', () => {
  const examples = [
    [schemaOf(F('id', new arrow.Int64()), F('name', new arrow.Utf8())), 113,
      '[{"children":[],"name":"id","nullable":true,"type":"l"},{"children":[],"name":"name","nullable":true,"type":"u"}]'],
    [schemaOf(F('ts', new arrow.TimestampMicrosecond('UTC'), false),
      F('price', new arrow.Decimal(2, 12, 128)),
      F('tags', new arrow.List(F('element', new arrow.Utf8())))), 240,
    '[{"children":[],"name":"ts","nullable":false,"type":"tsu:UTC"},{"children":[],"name":"price","nullable":true,"type":"d:12,2"},{"children":[{"children":[],"name":"item","nullable":true,"type":"u"}],"name":"tags","nullable":true,"type":"+l"}]'],
    [schemaOf(F('attrs', new arrow.Map_(F('entries', new arrow.Struct([
      F('key', new arrow.Utf8(), false), F('value', new arrow.Float64())]), false))),
    F('point', new arrow.Struct([F('x', new arrow.Int32()), F('y', new arrow.Int32())]))), 401,
    '[{"children":[{"children":[{"children":[],"name":"key","nullable":false,"type":"u"},{"children":[],"name":"value","nullable":true,"type":"g"}],"name":"entries","nullable":false,"type":"+s"}],"name":"attrs","nullable":true,"type":"+m"},{"children":[{"children":[],"name":"x","nullable":true,"type":"i"},{"children":[],"name":"y","nullable":true,"type":"i"}],"name":"point","nullable":true,"type":"+s"}]'],
    [schemaOf(F('say "hi"\n', new arrow.Int8()), F('<é>\u0001', new arrow.Bool())), 129,
      '[{"children":[],"name":"say \\"hi\\"\\n","nullable":true,"type":"c"},{"children":[],"name":"<é>\\u0001","nullable":true,"type":"b"}]'],
  ];
  for (const [schema, bytes, expected] of examples) {
    const got = canonicalSchema(schema);
    assert.equal(got, expected);
    assert.equal(Buffer.byteLength(got, 'utf8'), bytes);
    assert.equal(parseCanonical(got).text, expected);
  }
  const e = Buffer.from(canonicalSchema(schemaOf(F('<é>\u0001', new arrow.Bool()))));
  assert.ok(e.includes(Buffer.from([0xc3, 0xa9])));
});

test('6.3: a dictionary<int32, utf8> column has the form of a utf8 one', () => {
  const dict = schemaOf(F('name', new arrow.Dictionary(new arrow.Utf8(), new arrow.Int32())));
  assert.equal(canonicalSchema(dict), canonicalSchema(schemaOf(F('name', new arrow.Utf8()))));
});

test('6.2: the escapes of names, and what is not part of the form', () => {
  const names = ['"', '\\', '\b\f\n\r\t', '\u0000\u001f', '/<>&\u007f\u2028\u2029é日本'];
  const got = canonicalSchema(schemaOf(...names.map((n) => F(n, new arrow.Int8()))));
  assert.ok(got.includes('"name":"\\""') && got.includes('"name":"\\\\"'));
  assert.ok(got.includes('"name":"\\b\\f\\n\\r\\t"'));
  assert.ok(got.includes('"name":"\\u0000\\u001f"'));
  assert.ok(got.includes('"name":"/<>&\u007f\u2028\u2029é日本"'));
  const withMeta = new arrow.Schema([new arrow.Field('id', new arrow.Int64(), true,
    new Map([['k', 'v']]))], new Map([['a', 'b']]));
  assert.equal(canonicalSchema(withMeta), canonicalSchema(schemaOf(F('id', new arrow.Int64()))));
});

test('5, 6.2: refused schemas: no columns, duplicate names, types not carried', () => {
  assert.throws(() => canonicalSchema(schemaOf()), UnsupportedData);
  assert.throws(() => canonicalSchema(schemaOf(F('a', new arrow.Int8()), F('a', new arrow.Utf8()))),
    UnsupportedData);
  assert.throws(() => canonicalSchema(schemaOf(F('s', new arrow.Struct([
    F('x', new arrow.Int8()), F('x', new arrow.Int8())])))), UnsupportedData);
  assert.throws(() => canonicalSchema(schemaOf(F('i', new arrow.IntervalDayTime()))), UnsupportedData);
  assert.throws(() => canonicalSchema(schemaOf(F('d', new arrow.Decimal(0, 39, 128)))), UnsupportedData);
  assert.throws(() => parseCanonical('[{"children":[],"name":"x","nullable":true,"type":"tiD"}]'),
    UnsupportedData);
  assert.throws(() => parseCanonical('[]'), UnsupportedData);
  assert.throws(() => parseCanonical('[{"name":"x"}]'), UnsupportedData);
});

test('6.2: a name is Unicode text: no lone surrogate, no bytes that are not UTF-8', () => {
  assert.throws(() => canonicalSchema(schemaOf(F('a\ud800', new arrow.Int8()))), UnsupportedData);
  assert.throws(() => canonicalSchema(schemaOf(F('s', new arrow.Struct([
    F('\udc00x', new arrow.Int8())])))), UnsupportedData);
  // a payload whose struct child is named "xyz", then the same bytes with "x\xffz"
  const table = rowsToTable([{ s: { xyz: 1 } }], schemaOf(F('s', new arrow.Struct([
    F('xyz', new arrow.Int8())]))));
  const good = Buffer.from(arrow.tableToIPC(table, 'stream'));
  assert.equal(canonicalSchema(readIpcSchema(good)), canonicalSchema(table.schema));
  const at = good.indexOf('xyz');
  const bad = Buffer.from(good);
  bad[at + 1] = 0xff;
  assert.match(arrow.tableFromIPC(bad).schema.fields[0].type.children[0].name, /\ufffd/);
  assert.throws(() => readIpcSchema(bad), (e) => e instanceof UnsupportedData &&
    /not valid UTF-8/.test(e.message));
});

test('6.4: a non-canonical stored value is read (other key order, whitespace)', () => {
  const loose = '[ {"type": "l", "nullable": true, "name": "id", "children": [] },\n' +
    '{"name":"tags","nullable":true,"type":"+l","children":[{"name":"element","nullable":false,' +
    '"type":"u","children":[]}]}]';
  assert.equal(parseCanonical(loose).text, '[{"children":[],"name":"id","nullable":true,"type":"l"},' +
    '{"children":[{"children":[],"name":"item","nullable":false,"type":"u"}],"name":"tags",' +
    '"nullable":true,"type":"+l"}]');
});

for (const v of manifest.vectors) {
  test(`vector ${v.name}: canonical form (section 13)`, () => {
    const read = () => readIpcSchema(fs.readFileSync(path.join(VECTORS, v.file)));
    if (v.canonical === null) {
      // no Schema message at the start, or one whose schema has no canonical form (6.2)
      let schema = null;
      try {
        schema = read();
      } catch (e) {
        assert.ok(e instanceof UnsupportedData, e);
      }
      assert.equal(schema, null);
      return;
    }
    const schema = read();
    assert.equal(canonicalSchema(schema), v.canonical);
    assert.equal(parseCanonical(v.canonical).text, v.canonical);
  });

  test(`vector ${v.name}: the command line's canonical (Appendix A)`, () => {
    const run = () => execFileSync(process.execPath, [path.join(__dirname, '..', 'cli.js'),
      'canonical', '--payload', path.join(VECTORS, v.file)], { stdio: ['ignore', 'pipe', 'ignore'] });
    if (v.canonical === null) {
      assert.throws(run, (e) => e.status === 1);
    } else {
      assert.equal(run().toString('utf8'), `${v.canonical}\n`);
    }
  });
}

// What shaping (section 8) makes of each vector's schema against its table: the vectors the
// check refuses as they are are those a producer conforms or evolves first.
const SHAPED = {
  reordered: 'table', 'not-nullable': 'table', narrower: 'table', 'missing-nullable': 'table',
  'wrong-type': 'conflict', 'large-string': 'evolves', 'extra-column': 'evolves',
};
for (const v of manifest.vectors.filter((x) => x.table && x.canonical)) {
  test(`vector ${v.name}: shaped to table ${v.table} (section 8)`, () => {
    const table = parseCanonical(manifest.tables[v.table]).nodes;
    const batch = parseCanonical(v.canonical).nodes;
    const outcome = SHAPED[v.name] || 'table';
    assert.equal(v.check === 'accepted', v.canonical === manifest.tables[v.table]);
    if (outcome === 'conflict') {
      assert.throws(() => targetNodes(table, batch), (e) => e instanceof SchemaConflict &&
        e.column === 'id');
      return;
    }
    const target = canonicalText(targetNodes(table, batch));
    if (outcome === 'table') assert.equal(target, manifest.tables[v.table]);
    else assert.notEqual(target, manifest.tables[v.table]);
  });
}

test('8.2: widens to', () => {
  const n = (type, children = []) => ({ children, name: 'x', nullable: true, type });
  const yes = [['n', 'l'], ['n', '+s'], ['c', 'l'], ['i', 'i'], ['C', 'S'], ['C', 's'], ['I', 'l'],
    ['c', 'e'], ['i', 'g'], ['S', 'f'], ['e', 'g'], ['f', 'g'], ['u', 'U'], ['z', 'Z']];
  const no = [['l', 'g'], ['i', 'f'], ['s', 'e'], ['c', 'C'], ['S', 's'], ['L', 'l'], ['g', 'f'],
    ['U', 'u'], ['u', 'z'], ['l', 'n'], ['tsu:UTC', 'tsu:Etc/UTC'], ['tsm:', 'tsu:'], ['d:10,2', 'd:12,2']];
  for (const [a, b] of yes) assert.ok(widens(n(a), n(b)), `${a} -> ${b}`);
  for (const [a, b] of no) assert.ok(!widens(n(a), n(b)), `${a} -> ${b}`);
  const list = (t, nullable = true) => n('+l', [{ children: [], name: 'item', nullable, type: t }]);
  assert.ok(widens(list('i'), list('i')));
  assert.ok(!widens(list('i'), list('l')));
  assert.ok(!widens(list('i', false), list('i')));
});

test('8.1: target schema: order, widening both ways, new columns nullable, conflicts', () => {
  const f = (name, type, nullable = true) => ({ children: [], name, nullable, type });
  const table = [f('a', 'l', false), f('b', 'i'), f('c', 'u')];
  const target = targetNodes(table, [f('d', 'g', false), f('b', 'l', false), f('a', 'c')]);
  assert.deepEqual(target, [f('a', 'l', false), f('b', 'l'), f('c', 'u'), f('d', 'g')]);
  assert.throws(() => targetNodes(table, [f('b', 'i')]),
    (e) => e instanceof SchemaConflict && e.column === 'a' && /no such column/.test(e.message));
  assert.throws(() => targetNodes(table, [f('a', 'l'), f('c', 'l')]),
    (e) => e instanceof SchemaConflict && e.column === 'c');
});

test('8.3: conform: order, nulls for a missing column, casts, nullability', () => {
  const schema = parseCanonical('[{"children":[],"name":"n","nullable":true,"type":"i"},' +
    '{"children":[],"name":"s","nullable":false,"type":"u"},' +
    '{"children":[],"name":"big","nullable":true,"type":"L"}]').schema;
  const batch = rowsToTable([{ n: 1, s: 'x', big: 2n ** 64n - 1n }, { n: null, s: 'y', big: 0 }], schema);
  const f = (name, type, nullable = true) => ({ children: [], name, nullable, type });
  const target = [f('s', 'U', false), f('gone', 'tsn:'), f('n', 'g'), f('big', 'L')];
  const out = conform(batch, target);
  assert.equal(canonicalSchema(out.schema), canonicalText(target));
  assert.deepEqual(out.getChild('s').toArray(), ['x', 'y']);
  assert.equal(out.getChild('gone').nullCount, 2);
  assert.deepEqual([...out.getChild('n')], [1, null]);
  assert.deepEqual([...out.getChild('big')], [2n ** 64n - 1n, 0n]);
  assert.throws(() => conform(batch, [f('n', 'i', false)]),
    (e) => e instanceof SchemaConflict && e.column === 'n' && /with nulls/.test(e.message));
});

test('Appendix A rows: exact temporal values, lists, integers beyond 2^53', () => {
  const schema = parseCanonical('[{"children":[],"name":"t","nullable":true,"type":"tsn:UTC"},' +
    '{"children":[],"name":"d","nullable":true,"type":"tdD"},' +
    '{"children":[{"children":[],"name":"item","nullable":true,"type":"l"}],"name":"xs","nullable":true,"type":"+l"}]').schema;
  const rows = parseJsonExact('[{"t":1700000000123456789,"d":19000,"xs":[1,null,3]},{"xs":[]}]');
  const table = rowsToTable(rows, schema);
  const back = arrow.tableFromIPC(arrow.tableToIPC(table, 'stream'));
  assert.equal(back.getChild('t').data[0].values[0], 1700000000123456789n);
  assert.equal(back.getChild('d').data[0].values[0], 19000);
  assert.deepEqual([...back.getChild('xs').get(0)], [1n, null, 3n]);
  assert.equal(back.getChild('xs').get(1).length, 0);
  assert.throws(() => rowsToTable([{ t: 'soon' }], schema), UnsupportedData);
  assert.throws(() => rowsToTable([{ d: 1.5 }], schema), UnsupportedData);
});

test('schemaNodes reads the all-types vector back through Arrow exactly', () => {
  const v = manifest.vectors.find((x) => x.name === 'all-types');
  const { schema } = parseCanonical(v.canonical);
  assert.equal(canonicalText(schemaNodes(schema)), v.canonical);
  // and builds an all-null batch of every type, which arrow-js writes and reads back
  const table = rowsToTable([{ id: 1 }, { id: 2 }], schema);
  assert.equal(canonicalSchema(arrow.tableFromIPC(arrow.tableToIPC(table, 'stream')).schema), v.canonical);
});

test('Appendix A outcomes: the "error" of each failure and its exit status', () => {
  const outcomes = [
    [new SchemaConflict('x', 'id'), 'schema_conflict', 2],
    [new errors.Backpressure('x', 5), 'backpressure', 3],
    [new errors.UpgradeRequired(2), 'upgrade_required', 4],
    [new errors.OutOfMemory('x'), 'out_of_memory', 5],
    [new errors.SchemaRace('x'), 'schema_race', 6],
    [new errors.UnreadableTableSchema('x'), 'other', 1],
    [new Error('x'), 'other', 1],
  ];
  for (const [e, error, status] of outcomes) {
    assert.equal(failure(e).error, error);
    assert.equal(EXIT[error], status);
  }
  assert.equal(failure(new SchemaConflict('x', 'id')).column, 'id');
  assert.equal(failure(new errors.UpgradeRequired(2)).required, 2);
});

test('Appendix A values: binary and fixed-size binary from strings, decimals unscaled, maps', () => {
  const schema = parseCanonical('[{"children":[],"name":"b","nullable":true,"type":"z"},' +
    '{"children":[],"name":"w","nullable":true,"type":"w:2"},' +
    '{"children":[],"name":"d","nullable":true,"type":"d:40,2,256"},' +
    '{"children":[{"children":[{"children":[],"name":"key","nullable":false,"type":"u"},' +
    '{"children":[],"name":"value","nullable":true,"type":"l"}],"name":"entries",' +
    '"nullable":false,"type":"+s"}],"name":"m","nullable":true,"type":"+m"}]').schema;
  const rows = parseJsonExact('[{"b":"é","w":"ab","d":-1234567890123456789012345678901234567890,' +
    '"m":{"a":1}},{"m":[["a",2],["a",3]]}]');
  const back = arrow.tableFromIPC(arrow.tableToIPC(rowsToTable(rows, schema), 'stream'));
  assert.deepEqual([...back.getChild('b').get(0)], [0xc3, 0xa9]);
  assert.deepEqual([...back.getChild('w').get(0)], [0x61, 0x62]);
  const words = back.getChild('d').data[0].values.slice(0, 8);
  let x = 0n;
  for (let i = 7; i >= 0; i--) x = (x << 32n) | BigInt(words[i]);
  assert.equal(BigInt.asIntN(256, x), -1234567890123456789012345678901234567890n);
  assert.equal(back.getChild('m').data[0].children[0].length, 3); // the pairs, as they are
  assert.throws(() => rowsToTable([{ w: 'abc' }], schema), UnsupportedData);
  assert.throws(() => rowsToTable([{ d: 1.5 }], schema), UnsupportedData);
});

test('7.2: the check script is refused unless it has protocol 1\'s digest', () => {
  const dp = require('../producer');
  const spec = fs.readFileSync(path.join(ROOT, 'docs', 'spec.md'), 'utf8');
  assert.match(spec, new RegExp(`^SHA-256\\s+${dp.APPEND_CHECK_SHA256}$`, 'm'));
  const good = path.join(ROOT, 'producer', 'lua', 'append_check.lua');
  assert.ok(dp.loadCheckScript(good).equals(fs.readFileSync(good)));
  const copy = path.join(require('node:os').tmpdir(), `append_check_${process.pid}.lua`);
  try {
    fs.writeFileSync(copy, fs.readFileSync(good, 'utf8').replace(/\n/g, '\r\n'));
    assert.throws(() => dp.loadCheckScript(copy), (e) => e instanceof dp.WrongCheckScript &&
      e.message.includes(copy) && e.message.includes(dp.APPEND_CHECK_SHA256));
  } finally {
    fs.rmSync(copy, { force: true });
  }
  const env = { ...process.env, DELTAFLUSH_APPEND_CHECK: path.join(VECTORS, 'garbage.arrows') };
  const run = require('node:child_process').spawnSync(process.execPath, [path.join(__dirname,
    '..', 'cli.js'), 'request-flush', '--redis', 'redis://127.0.0.1:1/0', '--table', 't'], { env });
  assert.equal(run.status, 1);
  const out = JSON.parse(run.stdout.toString().trim().split('\n').pop());
  assert.equal(out.error, 'other');
  assert.match(out.message, /not the append check of deltaflush protocol 1/);
});
