#!/usr/bin/env node
// The TerminAI brain's entrypoint: runs inside the AppContainer on Windows
// and reaches the host only through the broker's pipe. Plain Node.js, no
// dependencies. The wire format is newline-delimited JSON, documented in
// docs/brain-protocol.md:
//   request   {"id": ..., "method": "...", "params": {...}}
//   response  {"id": ..., "success": true, "data": ...}
//             {"id": ..., "success": false, "error": "...", "code": "..."}
// The brain speaks first: hello with the session token. Then both sides send
// requests: the brain asks the broker to execute, read, write...; the broker
// pings the brain and tells it to shut down.
//
//   node agent-brain.js --pipe=\\.\pipe\terminai-<session> [--module=PATH]
//   environment: TERMINAI_BROKER_PIPE, TERMINAI_HANDSHAKE_TOKEN,
//                TERMINAI_WORKSPACE_PATH, TERMINAI_CLI_VERSION, TERMINAI_BRAIN_MODULE
'use strict';

const net = require('net');
const path = require('path');

const BRAIN_VERSION = '1.0.0';
const PROTOCOL_VERSION = 1;
const MAX_MESSAGE = 1 << 20;

function parseArgs(argv, env) {
  const opts = {
    pipe: env.TERMINAI_BROKER_PIPE || '',
    token: env.TERMINAI_HANDSHAKE_TOKEN || '',
    module: env.TERMINAI_BRAIN_MODULE || '',
    workspace: env.TERMINAI_WORKSPACE_PATH || '',
    cliVersion: env.TERMINAI_CLI_VERSION || '',
    requestTimeoutMs: 60000,
    maxRetries: 8,
  };
  for (const arg of argv) {
    const m = /^--([a-z-]+)=(.*)$/s.exec(arg);
    if (!m) continue;
    const key = m[1].replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (key in opts) opts[key] = typeof opts[key] === 'number' ? Number(m[2]) : m[2];
  }
  return opts;
}

class Brain {
  constructor(opts) {
    this.opts = opts;
    this.nextId = 1;
    this.pending = new Map();
    this.socket = null;
    this.buffer = '';
    this.ready = null;
    this.stopping = false;
    this.shutdownHandlers = [];
  }

  // Connect (again) and say hello; resolves once the broker accepted the token.
  connect() {
    this.buffer = '';
    this.ready = new Promise((resolve, reject) => {
      const socket = net.createConnection(this.opts.pipe);
      this.socket = socket;
      socket.setEncoding('utf8');
      socket.on('connect', () => {
        socket.everConnected = true;
        this.request('hello', { token: this.opts.token, clientVersion: this.opts.cliVersion,
                                brainVersion: BRAIN_VERSION, protocolVersion: PROTOCOL_VERSION }, { early: true })
          .then(resolve, (err) => {
            if (err.code === 'HANDSHAKE_FAILED') {
              process.stderr.write(`agent-brain: the broker refused the handshake: ${err.message}\n`);
              process.exit(3); // never retried: a wrong token stays wrong
            }
            reject(err);
          });
      });
      socket.on('data', (chunk) => this.onData(chunk));
      socket.on('error', (err) => reject(err));
      // Only a connection that had been established starts a reconnect; a
      // failed attempt is retried by the one backoff loop that made it.
      socket.on('close', () => { if (socket.everConnected) this.onClose(socket); else reject(new Error('closed')); });
    });
    return this.ready;
  }

  async connectWithBackoff() {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.connect();
      } catch (err) {
        if (this.stopping || attempt >= this.opts.maxRetries) throw err;
        const delay = Math.min(5000, 100 * 2 ** attempt);
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  onData(chunk) {
    this.buffer += chunk;
    let nl;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      if (line.trim()) this.onMessage(line);
    }
    if (this.buffer.length > MAX_MESSAGE) {
      process.stderr.write('agent-brain: oversized message from the broker; reconnecting\n');
      this.socket.destroy();
    }
  }

  onMessage(line) {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      process.stderr.write('agent-brain: malformed message from the broker\n');
      return;
    }
    if (typeof msg.method === 'string') return this.onRequest(msg);
    const waiter = this.pending.get(msg.id);
    if (!waiter) return;
    this.pending.delete(msg.id);
    clearTimeout(waiter.timer);
    if (msg.success) waiter.resolve(msg.data);
    else waiter.reject(Object.assign(new Error(msg.error || 'request failed'), { code: msg.code }));
  }

  send(msg) {
    this.socket.write(JSON.stringify(msg) + '\n');
  }

  // The broker's requests to the brain.
  onRequest(msg) {
    if (msg.method === 'ping') {
      this.send({ id: msg.id, success: true, data: { pong: true, timestamp: Date.now(), brainVersion: BRAIN_VERSION } });
    } else if (msg.method === 'shutdown') {
      this.send({ id: msg.id, success: true, data: {} });
      this.stop(0);
    } else {
      this.send({ id: msg.id, success: false, error: `unknown method ${msg.method}`, code: 'INVALID_REQUEST' });
    }
  }

  // A request to the broker; many may be in flight, matched by id.
  async request(method, params = {}, { timeoutMs, early } = {}) {
    if (!early) await this.ready;
    const id = `${process.pid}-${this.nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(Object.assign(new Error(`${method} timed out`), { code: 'TIMEOUT' }));
      }, timeoutMs || this.opts.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send({ id, method, params });
    });
  }

  onClose(socket) {
    if (socket !== this.socket) return; // an old connection: a newer one is already in place
    for (const [id, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      waiter.reject(Object.assign(new Error('the broker connection closed'), { code: 'DISCONNECTED' }));
      this.pending.delete(id);
    }
    if (this.stopping) return;
    process.stderr.write('agent-brain: the broker pipe dropped; reconnecting\n');
    this.ready = this.connectWithBackoff().catch((err) => {
      process.stderr.write(`agent-brain: cannot reach the broker: ${err.message}\n`);
      this.stop(4);
    });
  }

  stop(code) {
    if (this.stopping) return;
    this.stopping = true;
    Promise.allSettled(this.shutdownHandlers.map((fn) => fn())).finally(() => {
      if (this.socket) this.socket.end();
      process.exitCode = code;
      setTimeout(() => process.exit(code), 200).unref();
    });
  }

  api() {
    return {
      version: BRAIN_VERSION,
      protocolVersion: PROTOCOL_VERSION,
      workspace: this.opts.workspace,
      request: (method, params, options) => this.request(method, params, options),
      onShutdown: (fn) => this.shutdownHandlers.push(fn),
      exit: (code = 0) => this.stop(code),
    };
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2), process.env);
  if (!opts.pipe) {
    process.stderr.write('agent-brain: no pipe: pass --pipe=NAME or set TERMINAI_BROKER_PIPE\n');
    process.exit(2);
  }
  if (opts.token.length < 16) {
    process.stderr.write('agent-brain: TERMINAI_HANDSHAKE_TOKEN is missing or shorter than 16 characters\n');
    process.exit(2);
  }
  const brain = new Brain(opts);
  process.on('SIGTERM', () => brain.stop(0));
  try {
    await brain.connectWithBackoff();
  } catch (err) {
    process.stderr.write(`agent-brain: cannot reach the broker at ${opts.pipe}: ${err.message}\n`);
    process.exit(4);
  }
  if (opts.module) {
    // The CLI's bundled brain logic, loaded only after the handshake succeeded.
    const logic = require(path.resolve(opts.module));
    const run = typeof logic === 'function' ? logic : logic.default || logic.run;
    await Promise.resolve(run(brain.api())).catch((err) => {
      process.stderr.write(`agent-brain: the brain module failed: ${err && err.stack ? err.stack : err}\n`);
      brain.stop(5);
    });
  }
}

if (require.main === module) main();
module.exports = { Brain, parseArgs, BRAIN_VERSION, PROTOCOL_VERSION };
