'use strict';
// The producer against a real redis-server (skipped when none is on PATH): the check's
// verdict on every vector (section 13), registration, evolution and its compare-and-set,
// retries, backpressure, protocol refusal, tables from before protocol 1, flush requests.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { spawn, spawnSync } = require('node:child_process');
const arrow = require('apache-arrow');
const Redis = require('ioredis');
const { parseCanonical, canonicalSchema } = require('../canonical');
const { rowsToTable } = require('../shape');
const dp = require('../producer');

const VECTORS = path.join(__dirname, '..', '..', '..', 'spec', 'vectors');
const manifest = JSON.parse(fs.readFileSync(path.join(VECTORS, 'manifest.json'), 'utf8'));
const haveRedis = spawnSync('redis-server', ['--version']).status === 0;
const BASE = manifest.tables.base;

let server;
let url;
let admin;

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

test.before(async () => {
  if (!haveRedis) return;
  const port = await freePort();
  server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '',
    '--appendonly', 'no'], { stdio: 'ignore' });
  url = `redis://127.0.0.1:${port}/0`;
  admin = new Redis(url);
  admin.on('error', () => {}); // until the server listens
  for (let i = 0; i < 50; i++) {
    try { await admin.ping(); break; } catch { await new Promise((r) => setTimeout(r, 100)); }
  }
});

test.after(async () => {
  if (admin) admin.disconnect();
  if (server) server.kill();
});

const opts = { skip: haveRedis ? false : 'no redis-server on PATH' };
const key = (table, name) => `deltaflush:{${table}}:${name}`;
let counter = 0;
const fresh = () => `t${process.pid}_${++counter}`;

function batchOf(canonical, rows) {
  return rowsToTable(rows, parseCanonical(canonical).schema);
}
const idName = (n) => Array.from({ length: n }, (_, i) => ({ id: i, name: `n${i}` }));

test('the check\'s verdict on every vector, claiming its own canonical form', opts, async () => {
  const p = new dp.Producer({ redis: url });
  try {
    for (const v of manifest.vectors) {
      const table = fresh();
      if (v.table) await p.append(table, batchOf(manifest.tables[v.table], idName(1)));
      const claimed = v.canonical ?? manifest.tables[v.table];
      const payload = fs.readFileSync(path.join(VECTORS, v.file));
      const [code] = await p.appendPayload(table, payload, 3, Buffer.from(claimed));
      assert.equal(code === 1 ? 'accepted' : code === 0 ? 'conflict' : code, v.check, v.name);
    }
  } finally { await p.close(); }
});

test('registration, acceptance, pending counters and the entry\'s fields', opts, async () => {
  const p = new dp.Producer({ redis: url });
  const table = fresh();
  try {
    const id = await p.append(table, batchOf(BASE, idName(3)));
    assert.ok(await admin.sismember('deltaflush:tables', table));
    assert.equal(await admin.get(key(table, 'schema')), BASE);
    const [[entryId, fields]] = await admin.xrangeBuffer(key(table, 'delta'), '-', '+');
    assert.equal(entryId.toString(), id);
    assert.deepEqual(fields.filter((_, i) => i % 2 === 0).map(String), ['arrow', 'rows', 'batch']);
    assert.equal(fields[3].toString(), '3');
    assert.match(fields[5].toString(), /^[0-9a-f]{32}$/);
    assert.equal(canonicalSchema(arrow.tableFromIPC(fields[1]).schema), BASE);
    assert.deepEqual(await admin.hgetall(key(table, 'pending')),
      { rows: '3', bytes: String(fields[1].length) });
  } finally { await p.close(); }
});

test('a retried transaction (same batch ID) is appended once (7.5)', opts, async () => {
  const p = new dp.Producer({ redis: url });
  const table = fresh();
  try {
    await p.register(table);
    const payload = Buffer.from(arrow.tableToIPC(batchOf(BASE, idName(2)), 'stream'));
    const args = { payload, rows: 2, batchId: 'b'.repeat(32), schema: BASE };
    const first = await p.transact(table, args);
    const again = await p.transact(table, args);
    assert.equal(first[0], 1);
    assert.equal(again[1].toString(), first[1].toString());
    assert.equal(await admin.xlen(key(table, 'delta')), 1);
  } finally { await p.close(); }
});

test('evolution across producers, and a conflicting batch refused (section 8)', opts, async () => {
  const a = new dp.Producer({ redis: url });
  const b = new dp.Producer({ redis: url });
  const table = fresh();
  const narrow = '[{"children":[],"name":"id","nullable":true,"type":"i"}]';
  try {
    await a.append(table, batchOf(narrow, [{ id: 1 }]));
    await b.register(table); // b knows the int32 schema
    // a widens id to int64 and adds a column
    await a.append(table, batchOf(BASE, idName(1)));
    assert.equal(await admin.get(key(table, 'schema')), BASE);
    // b still sends int32 batches: CONFLICT, reshaped (widened to the new schema), accepted
    await b.append(table, batchOf(narrow, [{ id: 7 }]));
    const last = await admin.xrevrangeBuffer(key(table, 'delta'), '+', '-', 'COUNT', 1);
    const sent = arrow.tableFromIPC(last[0][1][1]);
    assert.equal(canonicalSchema(sent.schema), BASE);
    assert.equal(sent.getChild('id').get(0), 7n);
    await assert.rejects(b.append(table, batchOf(
      '[{"children":[],"name":"id","nullable":true,"type":"u"}]', [{ id: 'x' }])),
    (e) => e instanceof dp.SchemaConflict && e.column === 'id');
    assert.equal(await admin.xlen(key(table, 'delta')), 3);
  } finally { await a.close(); await b.close(); }
});

test('a non-canonical stored value is brought to canonical form (6.4)', opts, async () => {
  const p = new dp.Producer({ redis: url });
  const table = fresh();
  try {
    await admin.set(key(table, 'schema'), JSON.stringify(JSON.parse(BASE), null, 1));
    await p.append(table, batchOf(BASE, idName(1)));
    assert.equal(await admin.get(key(table, 'schema')), BASE);
  } finally { await p.close(); }
});

test('a table from before protocol 1 is converted (section 11)', opts, async () => {
  const p = new dp.Producer({ redis: url });
  const table = fresh();
  try {
    const stream = Buffer.from(arrow.tableToIPC(batchOf(BASE, idName(1)), 'stream'));
    const schemaMessage = stream.subarray(0, 8 + stream.readInt32LE(4));
    await admin.set(key(table, 'schema'), schemaMessage);
    await p.append(table, batchOf(BASE, idName(1)));
    assert.equal(await admin.get(key(table, 'schema')), BASE);
    const q = new dp.Producer({ redis: url });
    const other = fresh();
    await admin.set(key(other, 'schema'), Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
    await assert.rejects(q.append(other, batchOf(BASE, idName(1))), /protocol 1/);
    await q.close();
  } finally { await p.close(); }
});

test('backpressure: refused, then accepted once the table has room (7.6)', opts, async () => {
  const p = new dp.Producer({ redis: url, maxPendingBytes: 100 });
  const table = fresh();
  try {
    await p.append(table, batchOf(BASE, idName(1))); // an empty delta is never refused
    await assert.rejects(p.append(table, batchOf(BASE, idName(1))), dp.Backpressure);
    assert.equal(await admin.hget(key(table, 'stats'), 'backpressure'), '1');
    // a "flush" while the producer waits
    setTimeout(async () => {
      const [[id]] = await admin.xrange(key(table, 'delta'), '-', '+');
      await admin.multi().xdel(key(table, 'delta'), id).hset(key(table, 'pending'), 'bytes', 0).exec();
    }, 300);
    assert.match(await p.append(table, batchOf(BASE, idName(1)), { timeoutMs: 5000 }), /^\d+-\d+$/);
  } finally { await p.close(); }
});

test('a table requiring a later protocol refuses, without retry (section 10)', opts, async () => {
  const p = new dp.Producer({ redis: url });
  const table = fresh();
  try {
    await admin.set(key(table, 'protocol'), '2');
    await assert.rejects(p.append(table, batchOf(BASE, idName(1))),
      (e) => e instanceof dp.UpgradeRequired && e.required === 2 && !e.retryable);
    assert.equal(await admin.xlen(key(table, 'delta')), 0);
  } finally { await p.close(); }
});

test('bad names and empty batches are refused before anything is written', opts, async () => {
  const p = new dp.Producer({ redis: url });
  try {
    for (const bad of ['', '1a', '_a', 'a-b', 'a'.repeat(129), 'a{b}']) {
      await assert.rejects(p.append(bad, batchOf(BASE, idName(1))), dp.InvalidTableName);
    }
    await assert.rejects(p.append('fine', batchOf(BASE, [])), dp.UnsupportedData);
    assert.equal(await admin.sismember('deltaflush:tables', 'fine'), 0);
  } finally { await p.close(); }
});

test('a flush request sets flush_requested, and only it (section 9)', opts, async () => {
  const p = new dp.Producer({ redis: url, prefix: 'other' });
  const table = fresh();
  try {
    const before = Date.now();
    await p.requestFlush(table);
    const sched = await admin.hgetall(`other:{${table}}:sched`);
    assert.deepEqual(Object.keys(sched), ['flush_requested']);
    assert.ok(Number(sched.flush_requested) >= before);
  } finally { await p.close(); }
});

test('the permissions of section 12 are enough', opts, async () => {
  await admin.call('ACL', 'SETUSER', 'producer', 'on', '>secret', '~deltaflush:*', '+sadd', '+get',
    '+multi', '+exec', '+xadd', '+eval', '+set', '+hget', '+hincrby', '+xlen', '+xdel',
    '+xgroup|setid', '+xgroup|create', '+xinfo|groups', '+xrevrange', '+hset');
  const limited = url.replace('redis://', 'redis://producer:secret@');
  const p = new dp.Producer({ redis: limited });
  const tight = new dp.Producer({ redis: limited, maxPendingBytes: 100 });
  const table = fresh();
  const narrow = '[{"children":[],"name":"id","nullable":true,"type":"i"}]';
  try {
    await p.append(table, batchOf(narrow, [{ id: 1 }]));
    await p.append(table, batchOf(BASE, idName(1))); // evolves
    assert.equal(await admin.get(key(table, 'schema')), BASE);
    await assert.rejects(tight.append(table, batchOf(BASE, idName(1))), dp.Backpressure);
    await p.requestFlush(table);
  } finally { await p.close(); await tight.close(); }
});

test('section 12: a database other than 0 needs +select, and nothing goes to database 0 without it',
  opts, async () => {
    await admin.call('ACL', 'SETUSER', 'db1', 'on', '>secret', '~deltaflush:*', '+sadd', '+get',
      '+multi', '+exec', '+xadd', '+eval', '+set', '+hget', '+hincrby', '+xlen', '+xdel',
      '+xgroup|setid', '+xgroup|create', '+xinfo|groups', '+xrevrange', '+hset');
    const base = url.replace('redis://', 'redis://db1:secret@');
    const table = fresh();
    // ioredis only emits an 'error' for the SELECT it sends on connecting, and goes on in
    // database 0: the producer's own SELECT, in each MULTI, refuses every command instead
    const refused = new dp.Producer({ redis: base.replace(/\/0$/, '/1') });
    try {
      await assert.rejects(refused.append(table, batchOf(BASE, idName(1))), /NOPERM.*select/i);
      await assert.rejects(refused.appendPayload(table, Buffer.from('x'), 1, BASE), /select/i);
      await assert.rejects(refused.requestFlush(table), /NOPERM.*select/i);
    } finally { refused.redis.disconnect(); }
    assert.deepEqual(await admin.keys(`*${table}*`), []); // nothing in database 0
    await admin.call('ACL', 'SETUSER', 'db1', '+select');
    const p = new dp.Producer({ redis: base.replace(/\/0$/, '/1') });
    try {
      await p.append(table, batchOf(BASE, idName(1)));
    } finally { await p.close(); }
    const other = new Redis(url.replace(/\/0$/, '/1'));
    try {
      assert.equal(await other.xlen(key(table, 'delta')), 1);
      await other.flushdb();
    } finally {
      other.disconnect();
      await admin.call('ACL', 'DELUSER', 'db1');
    }
  });

test('section 8: 4 CONFLICTs for one batch, or one returning the schema just used: SchemaRace',
  opts, async () => {
    const p = new dp.Producer({ redis: url });
    const other = new dp.Producer({ redis: url });
    const table = fresh();
    const withExtra = (n) => JSON.stringify([...JSON.parse(BASE),
      { children: [], name: `extra${n}`, nullable: true, type: 'l' }]);
    try {
      await p.append(table, batchOf(BASE, idName(1)));
      const real = p.transact.bind(p);
      let sends = 0;
      p.transact = async (t, args) => { // another producer evolves the table before each send
        sends++;
        await other.append(t, batchOf(withExtra(sends), [{ id: 100 + sends, name: 'o' }]));
        return real(t, args);
      };
      await assert.rejects(p.append(table, batchOf(BASE, idName(1))), dp.SchemaRace);
      assert.equal(sends, 4);
      sends = 0;
      p.transact = async (t, args) => { // a check that is not protocol 1's
        sends++;
        return [0, Buffer.from(args.schema)];
      };
      await assert.rejects(p.append(table, batchOf(BASE, idName(1))), dp.SchemaRace);
      assert.equal(sends, 1);
      assert.equal(await admin.xlen(key(table, 'delta')), 5); // 1 + the other's 4
    } finally { await p.close(); await other.close(); }
  });

test('a lost reply: the same transaction again, appended once (7.5)', opts, async () => {
  // A proxy that loses the reply to the first EXEC it forwards, closing the connection.
  const target = new URL(url);
  let lost = false;
  const proxy = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    let execSent = false;
    client.on('data', (d) => {
      if (!lost && /\r\nexec\r\n/i.test(d.toString('latin1'))) execSent = true;
      upstream.write(d);
    });
    upstream.on('data', (d) => {
      if (execSent && !lost) {
        lost = true;
        client.destroy();
        upstream.destroy();
        return;
      }
      client.write(d);
    });
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  const p = new dp.Producer({ redis: `redis://127.0.0.1:${proxy.address().port}/0` });
  const table = fresh();
  try {
    const id = await p.append(table, batchOf(BASE, idName(2)));
    assert.ok(lost, 'the proxy lost a reply');
    const entries = await admin.xrange(key(table, 'delta'), '-', '+');
    assert.deepEqual(entries.map(([entryId]) => entryId), [id]);
    assert.equal(await admin.hget(key(table, 'pending'), 'rows'), '2');
  } finally {
    await p.close();
    proxy.close();
  }
});

test('out of memory: a retryable error, nothing appended (7.4)', opts, async () => {
  const p = new dp.Producer({ redis: url });
  const table = fresh();
  try {
    await p.register(table);
    await admin.config('SET', 'maxmemory', '1');
    await assert.rejects(p.append(table, batchOf(BASE, idName(1))),
      (e) => e instanceof dp.OutOfMemory && e.retryable);
    await assert.rejects(p.append(fresh(), batchOf(BASE, idName(1))), dp.OutOfMemory);
  } finally {
    await admin.config('SET', 'maxmemory', '0');
    await p.close();
  }
  assert.equal(await admin.xlen(key(table, 'delta')), 0);
});
