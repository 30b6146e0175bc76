#!/usr/bin/env node
'use strict';
// The conformance harness's command line (docs/spec.md, Appendix A):
//   append --redis URL --table T --schema FILE --rows FILE [--max-pending-bytes N] [--prefix P]
//   append --redis URL --table T --schema FILE --payload FILE --row-count N [--max-pending-bytes N]
//          [--prefix P]
//   request-flush --redis URL --table T [--prefix P]
//   canonical --payload FILE
// The last line on stdout is one JSON object (canonical: the canonical form); logs go to stderr.

const fs = require('node:fs');
const { canonicalSchema, parseCanonical, readIpcSchema } = require('./canonical');
const { rowsToTable } = require('./shape');
const p = require('./producer');

const EXIT = { ok: 0, other: 1, schema_conflict: 2, backpressure: 3, upgrade_required: 4,
  out_of_memory: 5, schema_race: 6 };

class UsageError extends Error {}

function parseArgs(argv) {
  const [command, ...rest] = argv;
  const opts = {};
  for (let i = 0; i < rest.length; i += 2) {
    const flag = rest[i];
    if (!flag.startsWith('--') || i + 1 >= rest.length) {
      throw new UsageError(`expected --option value, got ${JSON.stringify(flag)}`);
    }
    opts[flag.slice(2)] = rest[i + 1];
  }
  return { command, opts };
}

/**
 * JSON.parse, except that integers beyond 2^53 become bigints instead of losing digits
 * (nanosecond timestamps since 1970 are about 1.7e18).
 */
function parseJsonExact(text) {
  const token = /\s*(?:("(?:[^"\\]|\\.)*")|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(true|false|null)|([[\]{},:]))/y;
  let at = 0;
  const next = () => {
    token.lastIndex = at;
    const m = token.exec(text);
    if (!m) throw new SyntaxError(`invalid JSON at offset ${at}`);
    at = token.lastIndex;
    return m;
  };
  const value = (m = next()) => {
    if (m[1] !== undefined) return JSON.parse(m[1]);
    if (m[2] !== undefined) {
      const n = Number(m[2]);
      return /^-?\d+$/.test(m[2]) && !Number.isSafeInteger(n) ? BigInt(m[2]) : n;
    }
    if (m[3] !== undefined) return JSON.parse(m[3]);
    const close = m[4] === '[' ? ']' : m[4] === '{' ? '}' : null;
    if (!close) throw new SyntaxError(`unexpected ${m[4]} at offset ${at}`);
    const out = close === ']' ? [] : {};
    let t = next();
    if (t[4] === close) return out;
    for (;;) {
      if (close === ']') {
        out.push(value(t));
      } else {
        if (t[1] === undefined || next()[4] !== ':') throw new SyntaxError(`bad object at ${at}`);
        out[JSON.parse(t[1])] = value();
      }
      t = next();
      if (t[4] === close) return out;
      if (t[4] !== ',') throw new SyntaxError(`expected , or ${close} at offset ${at}`);
      t = next();
    }
  };
  const result = value();
  if (text.slice(at).trim() !== '') throw new SyntaxError(`trailing text at offset ${at}`);
  return result;
}

function need(opts, ...names) {
  for (const n of names) if (opts[n] === undefined) throw new UsageError(`--${n} is required`);
}

function decimal(value, name) {
  if (!/^\d+$/.test(value)) throw new UsageError(`--${name} must be a decimal integer`);
  return Number(value);
}

/** The outcome of an error: [result object, exit status]. */
function failure(e) {
  if (e instanceof p.SchemaConflict) {
    return { ok: false, error: 'schema_conflict', column: e.column ?? null, message: e.message };
  }
  if (e instanceof p.Backpressure) return { ok: false, error: 'backpressure', message: e.message };
  if (e instanceof p.UpgradeRequired) {
    return { ok: false, error: 'upgrade_required', required: e.required, message: e.message };
  }
  if (e instanceof p.OutOfMemory) return { ok: false, error: 'out_of_memory', message: e.message };
  if (e instanceof p.SchemaRace) return { ok: false, error: 'schema_race', message: e.message };
  return { ok: false, error: 'other', message: e.message || String(e) };
}

/** `append --payload`: the payload as it is, one transaction; the reply as an outcome. */
async function appendPayload(producer, opts) {
  need(opts, 'row-count');
  const rows = decimal(opts['row-count'], 'row-count');
  const [code, value] = await producer.appendPayload(opts.table,
    fs.readFileSync(opts.payload), rows, fs.readFileSync(opts.schema));
  switch (code) {
    case 1: return { ok: true, entry_id: value.toString() };
    case 0: return { ok: false, error: 'schema_conflict', column: null,
      message: `CONFLICT: the table's schema is ${value.toString()}` };
    case 2: return failure(new p.Backpressure(`BACKPRESSURE: ${value} bytes pending`, value));
    case 3: return failure(new p.OutOfMemory(`Redis is out of memory: ${value}`));
    case 4: return failure(new p.UpgradeRequired(Number(value)));
    default: return { ok: false, error: 'other', message: `reply ${code}: ${value}` };
  }
}

async function run(command, opts) {
  if (command === 'canonical') {
    need(opts, 'payload');
    const schema = readIpcSchema(fs.readFileSync(opts.payload));
    if (!schema) throw new Error('not an Arrow IPC stream with a schema');
    return canonicalSchema(schema);
  }
  if (command !== 'append' && command !== 'request-flush') {
    throw new UsageError(`unknown command ${JSON.stringify(command)}: append, request-flush, canonical`);
  }
  need(opts, 'redis', 'table');
  const producer = new p.Producer({
    redis: opts.redis,
    prefix: opts.prefix ?? 'deltaflush',
    maxPendingBytes: opts['max-pending-bytes'] === undefined ? undefined
      : decimal(opts['max-pending-bytes'], 'max-pending-bytes'),
  });
  try {
    if (command === 'request-flush') {
      await producer.requestFlush(opts.table);
      return { ok: true };
    }
    need(opts, 'schema');
    if (opts.payload !== undefined) return await appendPayload(producer, opts);
    need(opts, 'rows');
    const { schema } = parseCanonical(fs.readFileSync(opts.schema));
    const table = rowsToTable(parseJsonExact(fs.readFileSync(opts.rows, 'utf8')), schema);
    return { ok: true, entry_id: await producer.append(opts.table, table) };
  } finally {
    await producer.close();
  }
}

async function main() {
  let command;
  let result;
  try {
    const args = parseArgs(process.argv.slice(2));
    command = args.command;
    result = await run(command, args.opts);
  } catch (e) {
    process.stderr.write(`${e.stack || e}\n`);
    result = failure(e);
  }
  if (command === 'canonical') {
    if (typeof result === 'string') process.stdout.write(`${result}\n`);
    process.exitCode = typeof result === 'string' ? 0 : 1;
    return;
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exitCode = result.ok ? 0 : EXIT[result.error];
}

if (require.main === module) main();

module.exports = { parseJsonExact, parseArgs, failure, EXIT };
