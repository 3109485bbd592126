// The TerminAI CLI's runtime contract, as its core package declares it. The
// contexts in this package implement it exactly; test/fixtures/ holds a copy
// of the CLI's own declaration that a consumer is type-checked against, so a
// drift between the two breaks the build.

export type RuntimeType = 'container' | 'local' | 'windows-appcontainer' | 'microvm';
export type ExecutionEnvironment = 'host' | 'container' | 'microvm' | 'appcontainer';

export interface ExecutionOptions {
  /** With `args`, `command` and `args` are the argv, never a shell; without, `command` is a line for the guest's `/bin/sh -c`. */
  args?: string[];
  cwd?: string;
  /**
   * The caller's environment. Only what it adds or changes relative to this process's own environment reaches
   * the guest, with locale, `TZ`, `TERM` and the terminal size; anything else only when named in `passEnv`
   * (so `{ ...process.env }` does not hand the host's keys and tokens to the guest).
   */
  env?: NodeJS.ProcessEnv;
  /** Names from `env` to pass even when they equal this process's own (a key the command really needs). */
  passEnv?: string[];
  /** milliseconds; the command's whole process group in the guest is killed when it runs out */
  timeout?: number;
  /** Aborting kills the command's whole process group in the guest; `execute` then rejects with an AbortError. */
  signal?: AbortSignal;
}

export interface ExecutionResult {
  stdout: string;
  stderr: string;
  /** The command's own exit status (128 + the signal's number when a signal ended it). */
  exitCode: number | null;
}

export interface HealthCheckResult {
  ok: boolean;
  error?: string;
}

export interface OutputStream {
  on(event: 'data', listener: (chunk: Buffer) => void): unknown;
  removeListener(event: 'data', listener: (chunk: Buffer) => void): unknown;
}

export interface RuntimeProcess {
  stdout?: OutputStream | null;
  stderr?: OutputStream | null;
  stdin?: NodeJS.WritableStream | null;
  pid?: number;
  kill(signal?: NodeJS.Signals | number): boolean;
  on(event: 'exit' | 'close', listener: (code: number | null, signal: NodeJS.Signals | null) => void): this;
  on(event: 'error', listener: (err: Error) => void): this;
}

export interface RuntimeContext {
  readonly type: RuntimeType;
  readonly executionEnvironment: ExecutionEnvironment;
  readonly isIsolated: boolean;
  readonly displayName: string;
  readonly pythonPath: string;
  readonly taptsVersion: string;
  healthCheck(): Promise<HealthCheckResult>;
  dispose(): Promise<void>;
  execute(command: string, options?: ExecutionOptions): Promise<ExecutionResult>;
  spawn(command: string, options?: ExecutionOptions): Promise<RuntimeProcess>;
}
