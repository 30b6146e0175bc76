'use strict';
// The deltaflush producer, protocol 1 (docs/spec.md): registration (7.1), the append
// transaction (7.2-7.4), batch IDs and retries (7.5), backpressure (7.6), shaping and
// evolution (8), flush requests (9), versions (10), tables from before protocol 1 (11).

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const arrow = require('apache-arrow');
const Redis = require('ioredis');
const { ReplyError } = Redis;
const { schemaNodes, canonicalText, parseCanonical, readIpcSchema } = require('./canonical');
const { targetNodes, conform } = require('./shape');
const errors = require('./errors');

const PROTOCOL = 1;
const TABLE_NAME = /^[A-Za-z][A-Za-z0-9_]{0,127}$/;
const PREFIX = /^[^{} ]+$/;
const DEDUP_TTL_S = 120;
const ID_GROUP = 'deltaflush:append';
const MAX_SENDS = 4; // one batch: the first try and 3 reshaped ones (section 8)
const DEFAULTS = {
  prefix: 'deltaflush',
  maxPendingBytes: 1073741824, // 1 GiB, ARGV 5
  maxBatchBytes: 64 * 1024 * 1024, // 64 MiB (section 4)
  retryForMs: 10000, // how long a lost connection is retried; at most 120 s (7.5)
};
// The check script, sent unchanged (7.2). The repository's copy is the one of this protocol.
const SCRIPT_PATH = process.env.DELTAFLUSH_APPEND_CHECK ||
  path.join(__dirname, '..', '..', 'producer', 'lua', 'append_check.lua');
// Protocol 1's check script is the file of this SHA-256 (docs/spec.md, 7.2).
const APPEND_CHECK_SHA256 = '2d696eed6944ad58e81d72cfed23f9102ce7809ae37b871ba48f977643083e17';

/** The check script at `file`, refused unless it is protocol 1's (7.2). */
function loadCheckScript(file = SCRIPT_PATH) {
  const script = fs.readFileSync(file);
  const digest = crypto.createHash('sha256').update(script).digest('hex');
  if (digest !== APPEND_CHECK_SHA256) {
    throw new errors.WrongCheckScript(`${file} is not the append check of deltaflush protocol ` +
      `1: its SHA-256 is ${digest}, protocol 1's is ${APPEND_CHECK_SHA256} (docs/spec.md, ` +
      '7.2). Use the append_check.lua of a deltaflush release that speaks protocol 1, unchanged' +
      ' (its line endings too).');
  }
  return script;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function checkTableName(table) {
  if (typeof table !== 'string' || !TABLE_NAME.test(table)) {
    throw new errors.InvalidTableName(`invalid table name ${JSON.stringify(table)}: it must ` +
      'match ^[A-Za-z][A-Za-z0-9_]{0,127}$ (docs/spec.md, section 2)');
  }
}

/** The keys of one table (section 2). */
function tableKeys(prefix, table, batchId = '') {
  const k = (name) => `${prefix}:{${table}}:${name}`;
  return {
    schema: k('schema'), delta: k('delta'), pending: k('pending'), stats: k('stats'),
    dedup: k(`batch:${batchId}`), dead: k('dead'), protocol: k('protocol'), sched: k('sched'),
  };
}

/**
 * What a producer knows of a table's schema from the stored value `raw` (a Buffer or null):
 * {raw, nodes} with nodes null when the table has none. A canonical form is read as JSON
 * (6.4); a value from before protocol 1 as an IPC Schema message (section 11).
 */
function readStored(raw) {
  if (raw === null || raw === undefined) return { raw: null, nodes: null };
  raw = Buffer.from(raw);
  if (raw[0] === 0x5b /* [ */) {
    try {
      return { raw, nodes: parseCanonical(raw).nodes };
    } catch (e) {
      throw new errors.UnreadableTableSchema(`the table's stored schema is not a canonical ` +
        `schema this producer can read (${e.message}); deltaflush protocol 1 stores one`);
    }
  }
  let nodes = null;
  try {
    const schema = readIpcSchema(raw);
    nodes = schema && schemaNodes(schema);
  } catch { /* refused below */ }
  if (!nodes) {
    throw new errors.UnreadableTableSchema('the table was created before deltaflush protocol 1 ' +
      'and its stored schema cannot be read: one append from the Python producer converts it');
  }
  return { raw, nodes }; // raw is not the canonical form: the next append replaces it (ARGV 4)
}

/** An error that means the reply was lost: the same transaction may be sent again. */
function isConnectionError(e) {
  if (e instanceof ReplyError || e instanceof errors.DeltaflushError) return false;
  return e.name === 'MaxRetriesPerRequestError' || /Connection is closed|Stream isn't writeable/
    .test(e.message) || ['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE'].includes(e.code);
}

/**
 * The error to report for a MULTI refused as a whole (a ReplyError: EXECABORT, OOM, NOPERM
 * of a command in it); nothing of it ran. Other errors (a lost connection) are returned as
 * they are.
 */
function refusal(e, what) {
  if (!(e instanceof ReplyError)) return e;
  const why = [e.message, ...(e.previousErrors || []).map((x) => x.message)].join('; ');
  if (/\bOOM\b/.test(why)) return new errors.OutOfMemory(`Redis is out of memory: ${why}`);
  return new errors.DeltaflushError(`Redis refused ${what}: ${why}`);
}

/** An arrow.Table from a Table or RecordBatch. */
function toTable(data) {
  if (data instanceof arrow.Table) return data;
  if (data instanceof arrow.RecordBatch) return new arrow.Table([data]);
  throw new errors.UnsupportedData('append takes an apache-arrow Table or RecordBatch ' +
    '(rowsToTable makes one from rows and a schema)');
}

class Producer {
  /**
   * @param {object} [options]
   * @param {string|Redis} [options.redis] a redis:// URL or an ioredis client
   * @param {string} [options.prefix] the key prefix (section 2)
   * @param {number} [options.maxPendingBytes] the backpressure limit, ARGV 5 (0: none)
   * @param {number} [options.maxBatchBytes] the largest payload sent
   * @param {number} [options.retryForMs] how long a lost connection is retried
   */
  constructor(options = {}) {
    const given = Object.entries(options).filter(([, v]) => v !== undefined);
    const o = { ...DEFAULTS, ...Object.fromEntries(given) };
    if (typeof o.prefix !== 'string' || !PREFIX.test(o.prefix)) {
      throw new errors.DeltaflushError(`invalid key prefix ${JSON.stringify(o.prefix)}: not ` +
        'empty, no {, } or space');
    }
    this.script = loadCheckScript(); // refused before any connection is opened
    this.prefix = o.prefix;
    this.maxPendingBytes = o.maxPendingBytes;
    this.maxBatchBytes = o.maxBatchBytes;
    this.retryForMs = Math.min(o.retryForMs, DEDUP_TTL_S * 1000);
    this.ownsRedis = !(o.redis && typeof o.redis.multi === 'function'); // else a client
    this.redis = this.ownsRedis ? new Redis(o.redis || 'redis://localhost:6379/0', {
      // Lost replies are retried here, transaction by transaction (7.5), not by ioredis:
      // a closed connection fails the commands waiting on it at once (with
      // autoResendUnfulfilledCommands off and retries left, ioredis would drop them silently).
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      enableReadyCheck: false, // INFO is not among the commands a producer needs (section 12)
    }) : o.redis;
    // Connection errors reach the caller through the commands they fail (and are retried).
    if (this.ownsRedis) this.redis.on('error', () => {});
    // ioredis reports a refused SELECT (no +select, or no such database) only as an 'error'
    // event, and goes on in database 0: in another database, every command of this producer
    // follows a SELECT of its own inside one MULTI, so that none runs in database 0 (12).
    this.db = Number((this.redis.options && this.redis.options.db) || 0);
    this.known = new Map(); // table -> {raw, nodes}: registered in this process
  }

  async close() {
    if (this.ownsRedis) await this.redis.quit().catch(() => this.redis.disconnect());
  }

  /**
   * A MULTI, after `SELECT db` when the database is not 0; its results are those of the
   * commands queued after the SELECT (`results`).
   */
  multi() {
    return this.db ? this.redis.multi().select(this.db) : this.redis.multi();
  }

  results(replies) {
    return this.db ? replies.slice(1) : replies;
  }

  /**
   * The [error, reply] pairs of the commands `queue` adds: pipelined in database 0, else in
   * one MULTI after a SELECT (see the constructor). Throws what `refusal` makes of a refused
   * MULTI.
   */
  async send(queue, what) {
    if (!this.db) return queue(this.redis.pipeline()).exec();
    try {
      return this.results(await queue(this.multi()).exec());
    } catch (e) {
      throw refusal(e, what);
    }
  }

  /** Runs `send` again on a lost connection, with backoff, for up to retryForMs. */
  async withRetries(send) {
    const start = Date.now();
    for (let wait = 50; ; wait = Math.min(wait * 2, 1000)) {
      try {
        return await send();
      } catch (e) {
        if (!isConnectionError(e) || Date.now() - start + wait > this.retryForMs) throw e;
        await sleep(wait);
      }
    }
  }

  /** Registers the table once per process and reads its schema (7.1). */
  async register(table) {
    checkTableName(table);
    if (!this.known.has(table)) {
      const keys = tableKeys(this.prefix, table);
      const replies = await this.withRetries(() => this.send((c) => c
        .sadd(`${this.prefix}:tables`, table).getBuffer(keys.schema), 'the registration'));
      for (const [err] of replies) {
        if (err && /^OOM/.test(err.message)) {
          throw new errors.OutOfMemory(`Redis is out of memory: ${err.message}`);
        }
        if (err) throw err;
      }
      this.known.set(table, readStored(replies[1][1]));
    }
    return this.known.get(table);
  }

  /**
   * One append transaction (7.2), retried as it is while its reply is lost (7.5).
   * Returns the check's reply: [code, value] with a Buffer value (entry ID, schema, text) or
   * an integer (pending bytes, required version).
   */
  async transact(table, { payload, rows, batchId, schema, evolvesFrom = '' }) {
    const keys = tableKeys(this.prefix, table, batchId);
    const argv = [schema, String(payload.length), String(rows), evolvesFrom,
      String(this.maxPendingBytes), '', String(DEDUP_TTL_S), ID_GROUP, String(PROTOCOL)];
    const reply = await this.withRetries(async () => {
      let results;
      try {
        results = await this.multi()
          .xadd(keys.delta, '*', 'arrow', payload, 'rows', String(rows), 'batch', batchId)
          .evalBuffer(this.script, 7, keys.schema, keys.delta, keys.pending, keys.stats,
            keys.dedup, keys.dead, keys.protocol, ...argv)
          .exec();
      } catch (e) {
        // EXEC refused as a whole (EXECABORT: OOM, NOPERM): nothing ran, nothing was
        // appended (7.4). A lost connection is thrown as it is, and retried.
        throw refusal(e, 'the append transaction');
      }
      if (results === null) throw new Error('the transaction was discarded');
      results = this.results(results);
      const [xaddErr] = results[0];
      const [evalErr, evalReply] = results[1];
      if (evalErr) {
        if (/OOM/.test(evalErr.message)) throw new errors.OutOfMemory(evalErr.message);
        // BADARGS, BADSCHEMA: the producer is at fault; the entry was taken out (7.4).
        throw new errors.DeltaflushError(`the append check refused the batch: ${evalErr.message}`);
      }
      if (xaddErr) throw xaddErr;
      return evalReply;
    });
    return [Number(reply[0]), reply[1]];
  }

  /**
   * Appends one batch (an apache-arrow Table or RecordBatch) to `table`, shaped to the
   * table's schema (section 8), and returns its stream entry ID.
   * With `timeoutMs` > 0, waits that long for room on BACKPRESSURE instead of throwing.
   */
  async append(table, data, { timeoutMs = 0 } = {}) {
    checkTableName(table);
    const batch = toTable(data);
    if (batch.numRows === 0) {
      throw new errors.UnsupportedData('an empty batch (0 rows) appends nothing (section 4)');
    }
    const batchNodes = schemaNodes(batch.schema); // refuses what protocol 1 does not carry
    const batchText = canonicalText(batchNodes);
    const deadline = Date.now() + timeoutMs;
    const batchId = crypto.randomUUID().replaceAll('-', '');
    await this.register(table);
    let sends = 0;
    for (;;) {
      const known = this.known.get(table);
      const target = known.nodes ? targetNodes(known.nodes, batchNodes) : batchNodes;
      const schema = canonicalText(target);
      const shaped = schema === batchText ? batch : conform(batch, target);
      const payload = Buffer.from(arrow.tableToIPC(shaped, 'stream'));
      if (payload.length > this.maxBatchBytes) {
        throw new errors.BatchTooLarge(`the batch is ${payload.length} bytes as Arrow IPC, over ` +
          `the limit of ${this.maxBatchBytes}: split it`);
      }
      const evolvesFrom = known.raw && !known.raw.equals(Buffer.from(schema)) ? known.raw : '';
      sends++;
      const [code, value] = await this.transact(table,
        { payload, rows: batch.numRows, batchId, schema, evolvesFrom });
      switch (code) {
        case 1:
          this.known.set(table, { raw: Buffer.from(schema), nodes: target });
          return value.toString();
        case 0:
          // CONFLICT: the table's schema changed; shape again from it (section 8). The same
          // stored value again would only resend the same transaction: never done.
          if (known.raw && known.raw.equals(value)) sends = MAX_SENDS;
          this.known.set(table, readStored(value));
          if (sends >= MAX_SENDS) {
            throw new errors.SchemaRace(`the schema of table ${table} kept changing: ` +
              `${MAX_SENDS} conflicting replies for one batch; try again`);
          }
          break;
        case 2:
          if (!(await this.waitForRoom(table, deadline))) {
            throw new errors.Backpressure(`table ${table} has ${value} bytes waiting to be ` +
              `flushed, at or over its limit of ${this.maxPendingBytes}; try again later`, value);
          }
          break;
        case 3:
          throw new errors.OutOfMemory(`Redis is out of memory: ${value}; try again later`);
        case 4:
          throw new errors.UpgradeRequired(Number(value));
        default:
          throw new errors.DeltaflushError(`unexpected reply from the append check: ${code}`);
      }
    }
  }

  /** After BACKPRESSURE, polls until the table has room or `deadline` passes (7.6). */
  async waitForRoom(table, deadline) {
    const keys = tableKeys(this.prefix, table);
    for (let wait = 50; Date.now() + wait <= deadline; wait = Math.min(wait * 2, 1000)) {
      await sleep(wait);
      const [[e1, bytes], [e2, len]] = await this.send((c) => c
        .hget(keys.pending, 'bytes').xlen(keys.delta), 'the wait for room');
      if (e1 || e2) throw e1 || e2;
      if (this.maxPendingBytes <= 0 || Number(bytes || 0) < this.maxPendingBytes || len === 0) {
        return true;
      }
    }
    return false;
  }

  /**
   * Sends `payload` as it is, claiming the canonical form `schema` (ARGV 1, byte for byte),
   * ARGV 4 and 6 empty, with no shaping and no retry after a refusal: Appendix A's
   * `append --payload`. Returns the reply.
   */
  async appendPayload(table, payload, rows, schema) {
    checkTableName(table);
    // Registration is the SADD alone: the stored schema does not change this transaction.
    const [[err]] = await this.withRetries(() => this.send((c) => c
      .sadd(`${this.prefix}:tables`, table), 'the registration'));
    if (err && /^OOM/.test(err.message)) {
      throw new errors.OutOfMemory(`Redis is out of memory: ${err.message}`);
    }
    if (err) throw err;
    const batchId = crypto.randomUUID().replaceAll('-', '');
    return this.transact(table, { payload: Buffer.from(payload), rows, batchId, schema });
  }

  /** Asks the workers to flush the table at their next scheduling round (section 9). */
  async requestFlush(table) {
    checkTableName(table);
    const { sched } = tableKeys(this.prefix, table);
    const [[err]] = await this.withRetries(() => this.send((c) => c
      .hset(sched, 'flush_requested', String(Date.now())), 'the flush request'));
    if (err) throw err;
  }
}

module.exports = {
  Producer, PROTOCOL, APPEND_CHECK_SHA256, checkTableName, tableKeys, readStored,
  loadCheckScript, ...errors,
};
