// A minimal client of `terminai-shim serve`, written the way the TerminAI CLI
// (Node.js/TypeScript) drives it: spawn the shim, one JSON object per line,
// requests matched to responses by id, notifications routed by processId.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

export class ShimClient {
  constructor(shimPath, args = ['serve'], env = process.env) {
    this.child = spawn(shimPath, args, { stdio: ['pipe', 'pipe', 'pipe'], env });
    this.nextId = 1;
    this.pending = new Map();
    this.processes = new Map();
    this.unclaimed = new Map(); // notifications for a processId not known yet
    this.stderr = '';
    this.child.stderr.on('data', (d) => { this.stderr += d; });
    this.exited = new Promise((resolve) => this.child.on('exit', (code, signal) => resolve({ code, signal })));
    createInterface({ input: this.child.stdout }).on('line', (line) => this.#onLine(line));
  }

  #onLine(line) {
    const msg = JSON.parse(line);
    if (msg.id !== undefined && msg.id !== null && this.pending.has(msg.id)) {
      const { resolve, reject } = this.pending.get(msg.id);
      this.pending.delete(msg.id);
      if (msg.error) {
        const err = new Error(`${msg.error.code}: ${msg.error.message}`);
        err.code = msg.error.code;
        err.ran = msg.error.ran;
        reject(err);
      } else {
        resolve(msg.result);
      }
      return;
    }
    if (msg.method === 'process.output' || msg.method === 'process.exit') {
      const proc = this.processes.get(msg.params.processId);
      if (proc) proc.emit(msg.method, msg.params);
      else this.unclaimed.set(msg.params.processId, [...(this.unclaimed.get(msg.params.processId) ?? []), msg]);
    }
  }

  request(method, params = {}) {
    const id = this.nextId++;
    const promise = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.child.stdin.write(JSON.stringify({ id, method, params }) + '\n');
    return promise;
  }

  // The CLI's runtime contract: spawn(command, {args, cwd, env, pty}) -> a process
  // with streamed stdout/stderr, stdin, kill(signal), resize (pty), and an exit event.
  // A PTY's output arrives base64-encoded (bytes); it is decoded here.
  async spawn(command, { args, cwd, env, pty } = {}) {
    const listeners = { stdout: [], stderr: [], exit: [] };
    const early = [];
    const proc = {
      stdout: '', stderr: '', exitCode: undefined,
      on: (event, fn) => { listeners[event].push(fn); return proc; },
      emit: (method, params) => {
        if (method === 'process.output') {
          const data = params.encoding === 'base64' ? Buffer.from(params.data, 'base64').toString('utf8') : params.data;
          proc[params.stream] += data;
          for (const fn of listeners[params.stream]) fn(data);
        } else {
          proc.exitCode = params.exitCode;
          for (const fn of listeners.exit) fn(params.exitCode, params.signal);
        }
      },
      write: (data) => this.request('process.write', { processId: proc.id, data }),
      end: () => this.request('process.closeStdin', { processId: proc.id }),
      kill: (signal = 'SIGTERM') => this.request('process.kill', { processId: proc.id, signal }),
      resize: (cols, rows) => this.request('process.resize', { processId: proc.id, cols, rows }),
      done: null,
    };
    proc.done = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
    const result = await this.request('spawn', { command, args, cwd, env, ...(pty ? { pty } : {}) });
    proc.id = result.processId;
    this.processes.set(proc.id, proc);
    for (const msg of this.unclaimed.get(proc.id) ?? []) proc.emit(msg.method, msg.params);
    this.unclaimed.delete(proc.id);
    return proc;
  }
}
