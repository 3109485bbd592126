// The TerminAI CLI's runtime contract, as its core package declares it. The
// contexts in this package implement it exactly; test/fixtures/ holds a copy
// of the CLI's own declaration that a consumer is type-checked against, so a
// drift between the two breaks the build.

export type RuntimeType = 'container' | 'local' | 'windows-appcontainer' | 'microvm';
export type ExecutionEnvironment = 'host' | 'container' | 'microvm' | 'appcontainer';

export interface ExecutionOptions {
  args?: string[];
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** milliseconds */
  timeout?: number;
}

export interface ExecutionResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  runtimeError?: string;
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
