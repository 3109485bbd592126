// A command started with `spawn`, shaped like Node's ChildProcess: stdout
// and stderr are readable streams of Buffers, stdin a writable stream, and
// `exit` then `close` report (code, signal).
import { EventEmitter } from 'node:events';
import { constants } from 'node:os';
import { PassThrough, Writable } from 'node:stream';
import type { ShimConnection, ProcessNotification } from './connection.js';
import type { RuntimeProcess } from './types.js';

const SIGNAL_NAMES = new Map<number, NodeJS.Signals>(
  Object.entries(constants.signals).map(([name, number]) => [number, name as NodeJS.Signals]),
);

export class ShimProcess extends EventEmitter implements RuntimeProcess {
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  readonly stdin: Writable;
  readonly pid: number | undefined;
  readonly processId: string;
  exitCode: number | null = null;
  signalCode: NodeJS.Signals | null = null;
  #connection: ShimConnection;
  #ended = false;

  constructor(connection: ShimConnection, processId: string, pid: number | undefined) {
    super();
    this.#connection = connection;
    this.processId = processId;
    this.pid = pid;
    const write = (data: Buffer): Promise<unknown> =>
      connection.request('process.write', { processId, data: data.toString('base64'), encoding: 'base64' });
    this.stdin = new Writable({
      write: (chunk: Buffer, _encoding, callback) => {
        write(Buffer.from(chunk)).then(() => callback(), (err: Error) => callback(err));
      },
      final: (callback) => {
        connection.request('process.closeStdin', { processId }).then(() => callback(), (err: Error) => callback(err));
      },
    });
    this.stdin.on('error', (err) => this.emit('error', err));
  }

  /** Called by the context with every notification for this process. */
  notify(n: ProcessNotification): void {
    if (this.#ended) return;
    const p = n.params;
    if (n.method === 'process.output' && p.data !== undefined) {
      const chunk = Buffer.from(p.data, p.encoding === 'base64' ? 'base64' : 'utf8');
      (p.stream === 'stderr' ? this.stderr : this.stdout).write(chunk);
      return;
    }
    if (n.method !== 'process.exit') return;
    this.#ended = true;
    this.exitCode = p.exitCode ?? null;
    this.signalCode = p.signal != null ? (SIGNAL_NAMES.get(p.signal) ?? null) : null;
    if (p.error) this.emit('error', new Error(`${p.error.code}: ${p.error.message}`));
    this.emit('exit', this.exitCode, this.signalCode);
    this.stdout.end();
    this.stderr.end();
    let open = 2;
    const closed = () => {
      if (--open === 0) this.emit('close', this.exitCode, this.signalCode);
    };
    this.stdout.once('end', closed).resume();
    this.stderr.once('end', closed).resume();
  }

  /** Like ChildProcess.kill: true when the signal was sent (delivery is asynchronous). */
  kill(signal: NodeJS.Signals | number = 'SIGTERM'): boolean {
    if (this.#ended || this.#connection.closed) return false;
    this.#connection.request('process.kill', { processId: this.processId, signal }).catch((err: Error) => {
      if (!this.#ended) this.emit('error', err);
    });
    return true;
  }

  /** A PTY process's new window size. */
  resize(cols: number, rows: number): Promise<unknown> {
    return this.#connection.request('process.resize', { processId: this.processId, cols, rows });
  }
}
