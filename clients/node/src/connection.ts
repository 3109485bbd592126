// One `terminai-shim serve` child and its JSON-lines protocol
// (docs/shim-protocol.md): requests matched to responses by id, process
// notifications routed to their process, progress passed to a listener.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createInterface } from 'node:readline';
import { ShimError } from './errors.js';

export interface ProcessNotification {
  method: 'process.output' | 'process.exit';
  params: {
    processId: string;
    stream?: 'stdout' | 'stderr';
    data?: string;
    encoding?: 'utf8' | 'base64';
    exitCode?: number | null;
    signal?: number | null;
    timedOut?: boolean;
    error?: { code: string; message: string; ran: boolean };
  };
}

export interface ProgressEvent {
  stage: 'verify' | 'download' | 'boot' | 'ready';
  name?: string;
  done?: number;
  total?: number;
  backend?: string;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: ShimError) => void;
}

const STDERR_KEPT = 16 * 1024;

export class ShimConnection {
  readonly child: ChildProcessWithoutNullStreams;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  onProgress: ((event: ProgressEvent) => void) | undefined;
  #nextId = 1;
  #pending = new Map<number, Pending>();
  #processes = new Map<string, (n: ProcessNotification) => void>();
  #unclaimed = new Map<string, ProcessNotification[]>();
  #stderr = '';
  #closed: ShimError | undefined;

  constructor(shimPath: string, env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(shimPath, ['serve'], { stdio: ['pipe', 'pipe', 'pipe'], env });
    this.child.stderr.setEncoding('utf8');
    this.child.stderr.on('data', (text: string) => {
      this.#stderr = (this.#stderr + text).slice(-STDERR_KEPT);
    });
    this.child.stdin.on('error', () => {}); // a dead shim is reported through `exited`, not as an unhandled error
    createInterface({ input: this.child.stdout }).on('line', (line) => this.#onLine(line));
    this.exited = new Promise((resolve) => {
      const done = (code: number | null, signal: NodeJS.Signals | null) => {
        this.#fail(new ShimError('SHIM_EXITED', `terminai-shim exited (${signal ?? code})${this.#tail()}`, { ran: true }));
        resolve({ code, signal });
      };
      this.child.on('exit', done);
      this.child.on('error', (err) => {
        this.#fail(new ShimError('SHIM_NOT_STARTED', `terminai-shim could not be started: ${err.message}`));
        resolve({ code: null, signal: null });
      });
    });
  }

  /** What the shim said on stderr lately (diagnostics only). */
  get stderr(): string {
    return this.#stderr;
  }

  #tail(): string {
    const last = this.#stderr.trim().split('\n').slice(-3).join(' | ');
    return last ? `: ${last}` : '';
  }

  #fail(error: ShimError): void {
    this.#closed ??= error;
    for (const pending of this.#pending.values()) pending.reject(error);
    this.#pending.clear();
    const gone: ProcessNotification = {
      method: 'process.exit',
      params: { processId: '', exitCode: null, signal: null, error: { code: 'VM_GONE', message: error.message, ran: true } },
    };
    for (const [processId, handler] of this.#processes) handler({ ...gone, params: { ...gone.params, processId } });
    this.#processes.clear();
  }

  #onLine(line: string): void {
    let msg: { id?: unknown; result?: unknown; error?: unknown; method?: string; params?: unknown };
    try {
      msg = JSON.parse(line);
    } catch {
      return; // the protocol is one JSON object per line; anything else is not ours to act on
    }
    if (msg.method === 'process.output' || msg.method === 'process.exit') {
      const n = msg as ProcessNotification;
      const handler = this.#processes.get(n.params.processId);
      if (handler) {
        handler(n);
        if (n.method === 'process.exit') this.#processes.delete(n.params.processId);
      } else {
        const held = this.#unclaimed.get(n.params.processId) ?? [];
        held.push(n);
        this.#unclaimed.set(n.params.processId, held);
      }
      return;
    }
    if (msg.method === 'initialize.progress') {
      this.onProgress?.(msg.params as ProgressEvent);
      return;
    }
    if (typeof msg.id !== 'number') return;
    const pending = this.#pending.get(msg.id);
    if (!pending) return;
    this.#pending.delete(msg.id);
    if (msg.error !== undefined) pending.reject(ShimError.from(msg.error));
    else pending.resolve(msg.result);
  }

  /** One request; its id, for `cancel`, is passed to `sent` as soon as it is written. */
  request<T>(method: string, params: Record<string, unknown> = {}, sent?: (id: number) => void): Promise<T> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = this.#nextId++;
    const promise = new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (value: unknown) => void, reject });
    });
    this.child.stdin.write(`${JSON.stringify({ id, method, params })}\n`);
    sent?.(id);
    return promise;
  }

  /** Route a process's notifications to `handler`, including any that arrived before it was claimed. */
  claim(processId: string, handler: (n: ProcessNotification) => void): void {
    const held = this.#unclaimed.get(processId) ?? [];
    this.#unclaimed.delete(processId);
    const exited = held.some((n) => n.method === 'process.exit');
    if (!exited) this.#processes.set(processId, handler);
    for (const n of held) handler(n);
  }

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}
