// The CLI's isolation tiers as RuntimeContexts, all through one shim
// protocol client. The tier is what differs: which backend `initialize`
// asks for, and so what `isAvailable` asks the shim's `ready`.
import { execFile } from 'node:child_process';
import { ShimConnection, type ProgressEvent } from './connection.js';
import { ShimError, ShimNotFound } from './errors.js';
import { locateShim } from './locate.js';
import { ShimProcess } from './process.js';
import type {
  ExecutionEnvironment,
  ExecutionOptions,
  ExecutionResult,
  HealthCheckResult,
  RuntimeContext,
  RuntimeType,
} from './types.js';

export type NetworkPolicy = 'none' | 'open' | { mode: 'none' | 'allowlist' | 'open'; allow?: string[] };

export interface RuntimeOptions {
  /** The shim to run; default: TERMINAI_SHIM, the per-platform package, then PATH. */
  shimPath?: string;
  /**
   * The signed release to boot: a directory or URL (`manifest`), or a published `store` and its `channel`.
   * Default: the shim's default release (`TERMINAI_RELEASE`, `~/.config/terminai/release.json`, which `inv release`
   * writes for a development release, or the store its build names).
   */
  release?: { manifest?: string; store?: string; channel?: string; version?: string; allowHttp?: boolean };
  /** Who must have signed it; default: the signer pinned in the shim for the channel. */
  trust?: { dev?: boolean; trustedRoot?: string; identity?: string; issuer?: string };
  /** A developer's own unsigned build outputs instead of a release (`layerFiles`: their own layers, bottom first). */
  artifacts?: {
    kernel?: string;
    rootfs?: string;
    /** The format of `rootfs` (default: from its name). */
    rootfsFormat?: 'squashfs' | 'erofs';
    image?: string;
    imageSha256?: string;
    layerFiles?: { name: string; path: string }[];
  };
  /**
   * The release's root filesystem: a profile it lists (`minimal`, `standard`: its default, `full`), or its
   * layers by name (each brings what it stands on; microVM only).
   */
  profile?: string;
  layers?: string[];
  /** The host directory the guest shares, at its host path: default, this process's working directory; `null` for none. */
  workspace?: string | null;
  workspaceMount?: string;
  network?: NetworkPolicy;
  memoryMib?: number;
  cpus?: number;
  accel?: 'auto' | 'kvm' | 'tcg';
  user?: 'user' | 'root';
  writableGit?: boolean;
  /** Share a workspace that is /, a home directory itself or a system directory (refused otherwise). */
  forceWorkspace?: boolean;
  cold?: boolean;
  /** Progress of the first start: verification, downloads, boot. */
  onEvent?: (event: ProgressEvent) => void;
  /** The shim's environment (default: this process's). */
  env?: NodeJS.ProcessEnv;
  /** Names a command's `env` passes to the guest even when they equal this process's own (see ExecutionOptions). */
  passEnv?: string[];
}

export interface Availability {
  available: boolean;
  reason: string;
  shim?: string;
  /** When not available: the error code `initialize` would reject with. */
  code?: string;
}

/** `terminai-shim ready --json`: whether `initialize` with these parameters would start here. */
interface ReadyReport {
  ready: boolean;
  reason: string;
  backend?: string | null;
  code?: string | null;
}

interface InitializeResult {
  type: 'microvm' | 'container';
  displayName: string;
  pythonPath?: string | null;
  backend: string;
  notice?: string;
  rootfs: RootfsInfo;
  pooled?: boolean;
}

/** The root filesystem that booted: the profile named (null for a developer's own files) and its layers. */
export interface RootfsInfo {
  profile: string | null;
  layers: string[];
}

interface ExecuteResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  runtimeError?: { code: string; message: string };
}

const READY_TIMEOUT_MS = 30_000; // a release verified for the first time, on a slow machine

function ready(shim: string, env: NodeJS.ProcessEnv, params: Record<string, unknown>): Promise<ReadyReport> {
  return new Promise((resolve, reject) => {
    // `ready` exits 1 when the answer is no; its report is still the answer.
    execFile(shim, ['ready', '--json', '--params', JSON.stringify(params)], { timeout: READY_TIMEOUT_MS, env },
      (error, stdout) => {
        try {
          resolve(JSON.parse(stdout) as ReadyReport);
        } catch {
          reject(new Error(`terminai-shim ready did not answer: ${error?.message ?? 'no report'}`));
        }
      });
  });
}

/** `initialize`'s parameters for these options and this tier (the shim's defaults apply to what is left out). */
function initializeParams(o: RuntimeOptions, tier: Record<string, unknown>): Record<string, unknown> {
  return defined({
    manifest: o.release?.manifest,
    store: o.release?.store,
    channel: o.release?.channel,
    release: o.release?.version,
    allowHttp: o.release?.allowHttp,
    dev: o.trust?.dev,
    trustedRoot: o.trust?.trustedRoot,
    identity: o.trust?.identity,
    issuer: o.trust?.issuer,
    kernel: o.artifacts?.kernel,
    rootfs: o.artifacts?.rootfs,
    rootfsFormat: o.artifacts?.rootfsFormat,
    image: o.artifacts?.image,
    imageSha256: o.artifacts?.imageSha256,
    layerFiles: o.artifacts?.layerFiles?.length ? o.artifacts.layerFiles : undefined,
    profile: o.profile,
    layers: o.layers,
    // The CLI works on the project it was started in: that directory, at the same path in the guest.
    workspace: o.workspace === undefined ? process.cwd() : o.workspace,
    workspaceMount: o.workspaceMount,
    network: o.network,
    memoryMib: o.memoryMib,
    cpus: o.cpus,
    accel: o.accel,
    user: o.user,
    writableGit: o.writableGit,
    forceWorkspace: o.forceWorkspace,
    cold: o.cold,
    ...tier,
  });
}

/** The options that were given (unset, empty, false or zero ones are left out: the shim's defaults apply). */
function defined(params: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(params).filter(([, value]) => Boolean(value)));
}

/** What describes the user's terminal rather than the user: passed on even when it repeats the host's. */
const TERMINAL_ENV = new Set(['LANG', 'LANGUAGE', 'TZ', 'TERM', 'COLORTERM', 'COLUMNS', 'LINES', 'NO_COLOR', 'FORCE_COLOR']);

/**
 * The part of a caller's `env` the guest gets: what it adds or changes relative to `host`, the terminal's
 * settings, and what `passEnv` names. The CLI passes `{ ...process.env }`; copying that wholesale would give
 * a hostile guest every key and token of the user's shell, and the host's PATH and HOME over the guest's.
 */
export function guestEnv(
  env: NodeJS.ProcessEnv | undefined,
  passEnv: readonly string[] = [],
  host: NodeJS.ProcessEnv = process.env,
): Record<string, string> | undefined {
  if (!env) return undefined;
  const named = new Set(passEnv);
  const kept = Object.entries(env).filter(
    (kv): kv is [string, string] =>
      typeof kv[1] === 'string' &&
      (host[kv[0]] !== kv[1] || TERMINAL_ENV.has(kv[0]) || kv[0].startsWith('LC_') || named.has(kv[0])),
  );
  return kept.length ? Object.fromEntries(kept) : undefined;
}

/** What Node's own APIs reject with when a signal aborts them. */
function abortError(signal: AbortSignal): DOMException {
  const error = new DOMException('The operation was aborted', 'AbortError');
  Object.defineProperty(error, 'cause', { value: signal.reason });
  return error;
}

abstract class ShimRuntimeContext implements RuntimeContext {
  abstract readonly type: RuntimeType;
  abstract readonly executionEnvironment: ExecutionEnvironment;
  readonly isIsolated = true;
  displayName = '';
  pythonPath = '';
  taptsVersion = '';
  /** The tier's own words when it is weaker than a microVM (show them to the user). */
  notice: string | undefined;
  /** What booted: the profile and its layers (set by initialize). */
  rootfs: RootfsInfo | undefined;
  /** Whether initialize took a VM that `prewarm` had kept waiting. */
  pooled = false;
  protected readonly options: RuntimeOptions;
  #connection: ShimConnection | undefined;
  #warm: ShimConnection | undefined; // prewarm's shim, until initialize takes it

  constructor(options: RuntimeOptions = {}) {
    this.options = options;
  }

  /** What `initialize` asks for on top of the options: the tier. */
  protected abstract tierParams(): Record<string, unknown>;

  protected get connection(): ShimConnection {
    if (!this.#connection) throw new ShimError('NOT_INITIALIZED', 'call initialize() first');
    return this.#connection;
  }

  /**
   * Start the shim now and have it keep a VM restored and waiting for this context's `initialize` (the shim's
   * warm pool): call it when the CLI starts, long before the first command needs the tier. Verification
   * errors come back here; the VM itself starts in the background. `dispose` ends it if it was never used.
   */
  async prewarm(): Promise<void> {
    if (this.#connection || this.#warm) return;
    const connection = this.#connect();
    this.#warm = connection;
    try {
      await connection.request('pool.warm', { params: this.#initializeParams() });
    } catch (error) {
      this.#warm = undefined;
      connection.kill();
      throw error;
    }
  }

  #connect(): ShimConnection {
    const o = this.options;
    const connection = new ShimConnection(locateShim(o.shimPath, o.env ?? process.env), o.env ?? process.env);
    connection.onProgress = o.onEvent;
    return connection;
  }

  async initialize(): Promise<void> {
    if (this.#connection) throw new ShimError('ALREADY_INITIALIZED', 'this context is already initialized');
    const connection = this.#warm ?? this.#connect();
    this.#warm = undefined;
    this.#connection = connection;
    try {
      const info = await connection.request<InitializeResult>('initialize', this.#initializeParams());
      this.displayName = info.displayName;
      this.pythonPath = info.pythonPath ?? '';
      this.notice = info.notice;
      this.rootfs = info.rootfs;
      this.pooled = info.pooled ?? false;
      this.options.onEvent?.({ stage: 'ready', backend: info.backend });
    } catch (error) {
      connection.kill();
      this.#connection = undefined;
      throw error;
    }
  }

  #initializeParams(): Record<string, unknown> {
    return initializeParams(this.options, this.tierParams());
  }

  async healthCheck(): Promise<HealthCheckResult> {
    try {
      const health = await this.connection.request<{ ok: boolean; error?: string; pythonPath?: string; taptsVersion?: string }>(
        'healthCheck',
      );
      if (health.ok) {
        this.pythonPath = health.pythonPath ?? this.pythonPath;
        this.taptsVersion = health.taptsVersion ?? this.taptsVersion;
        return { ok: true };
      }
      return { ok: false, error: health.error ?? 'the isolation tier is not healthy' };
    } catch (error) {
      return { ok: false, error: (error as Error).message };
    }
  }

  /**
   * Runs to the end. Resolves with the command's own exit status whenever the command ran; rejects, naming the
   * cause and what to do, when the tier could not run it or stopped under it (the VM or the shim gone, a
   * refused request), and with an AbortError when `options.signal` aborted it.
   */
  async execute(command: string, options: ExecutionOptions = {}): Promise<ExecutionResult> {
    const { signal } = options;
    if (signal?.aborted) throw abortError(signal);
    const connection = this.connection;
    let requestId: number | undefined;
    const onAbort = () => {
      if (requestId !== undefined) connection.request('cancel', { id: requestId }).catch(() => undefined);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    let result: ExecuteResult;
    try {
      result = await connection.request<ExecuteResult>('execute', this.#commandParams(command, options), (id) => {
        requestId = id;
        if (signal?.aborted) onAbort();
      });
    } catch (error) {
      throw error instanceof ShimError ? error : ShimError.from(error);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    if (signal?.aborted) throw abortError(signal);
    if (result.runtimeError && result.exitCode === null) {
      throw new ShimError(result.runtimeError.code, result.runtimeError.message, {
        ran: true,
        hint: 'the command may have run in part; check the isolation tier (healthCheck) and start a new context',
      });
    }
    const stderr = result.runtimeError ? `${result.stderr}${result.runtimeError.message}\n` : result.stderr;
    return { stdout: result.stdout, stderr, exitCode: result.exitCode };
  }

  /** Streams, as a ChildProcess does; `options.signal` kills it (SIGKILL to its group) and emits an AbortError. */
  async spawn(
    command: string,
    options: ExecutionOptions & { pty?: { cols: number; rows: number; term?: string } } = {},
  ): Promise<ShimProcess> {
    const { signal } = options;
    if (signal?.aborted) throw abortError(signal);
    const params = this.#commandParams(command, options);
    if (options.pty) params['pty'] = options.pty;
    const result = await this.connection.request<{ processId: string; pid: number }>('spawn', params);
    const proc = new ShimProcess(this.connection, result.processId, result.pid || undefined);
    this.connection.claim(result.processId, (n) => proc.notify(n));
    if (signal) {
      const onAbort = () => {
        if (proc.kill('SIGKILL')) proc.emit('error', abortError(signal));
      };
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
      proc.once('exit', () => signal.removeEventListener('abort', onAbort));
    }
    return proc;
  }

  async dispose(): Promise<void> {
    const connection = this.#connection ?? this.#warm;
    if (!connection) return;
    this.#connection = this.#warm = undefined;
    try {
      await connection.request('dispose');
    } catch {
      // the shim may already be gone (the VM died, or it was killed): it is stopped below either way
    }
    connection.child.stdin.end(); // a shim that keeps a warm pool serves until its input ends
    const timer = setTimeout(() => connection.kill(), 30_000);
    await connection.exited;
    clearTimeout(timer);
  }

  #commandParams(command: string, options: ExecutionOptions): Record<string, unknown> {
    // A line without args means what it means in the CLI's own shell tool: the guest's /bin/sh runs it
    // (the guest is the boundary). With args it is an argv and no shell sees it.
    const params: Record<string, unknown> = options.args ? { command, args: options.args } : { command, shell: true };
    if (options.cwd) params['cwd'] = options.cwd;
    const env = guestEnv(options.env, [...(this.options.passEnv ?? []), ...(options.passEnv ?? [])]);
    if (env) params['env'] = env;
    if (options.timeout) params['timeout'] = options.timeout;
    return params;
  }

  /** A real probe, fast (no boot): false, with the reason in `availability()`, when this tier cannot run here. */
  static async isAvailable(
    this: { availability(options?: RuntimeOptions): Promise<Availability> },
    options: RuntimeOptions = {},
  ): Promise<boolean> {
    return (await this.availability(options)).available;
  }

  /**
   * Exactly whether `initialize` with these options would start: the shim found, then the shim's `ready` runs
   * the launch's own checks up to the boot (the request, a release resolvable and its manifest verified, the
   * accelerator, the tier's program or engine), without booting anything.
   */
  protected static async probe(options: RuntimeOptions, tier: Record<string, unknown>): Promise<Availability> {
    let shim: string;
    try {
      shim = locateShim(options.shimPath, options.env ?? process.env);
    } catch (error) {
      return { available: false, reason: (error as ShimNotFound).message };
    }
    try {
      const report = await ready(shim, options.env ?? process.env, initializeParams(options, tier));
      return { available: report.ready === true, reason: report.reason, shim, ...(report.code ? { code: report.code } : {}) };
    } catch (error) {
      return { available: false, reason: (error as Error).message, shim };
    }
  }
}

const MICROVM_TIER = { backend: 'auto', requireMicrovm: true };
const CONTAINER_TIER = { backend: 'container' };

/** A microVM (QEMU, or Firecracker with KVM): its own kernel; never a weaker tier. */
export class MicroVMRuntimeContext extends ShimRuntimeContext {
  readonly type = 'microvm' as const;
  readonly executionEnvironment = 'microvm' as const;

  protected tierParams(): Record<string, unknown> {
    return MICROVM_TIER;
  }

  static availability(options: RuntimeOptions = {}): Promise<Availability> {
    return ShimRuntimeContext.probe(options, MICROVM_TIER);
  }
}

/** A locked-down Docker container from the same root image: shares the host's kernel. */
export class ContainerRuntimeContext extends ShimRuntimeContext {
  readonly type = 'container' as const;
  readonly executionEnvironment = 'container' as const;

  protected tierParams(): Record<string, unknown> {
    return CONTAINER_TIER;
  }

  static availability(options: RuntimeOptions = {}): Promise<Availability> {
    return ShimRuntimeContext.probe(options, CONTAINER_TIER);
  }
}

/** The Windows tier's options: the CLI's own two (RuntimeManager passes both), on top of the shared ones. */
export interface WindowsOptions extends RuntimeOptions {
  /** The CLI's version, passed to the broker for its audit records. */
  cliVersion?: string;
  /** The directory the brain's file operations are confined to (the CLI's `~/.terminai/workspace`). */
  workspacePath?: string;
}

/**
 * The Windows AppContainer "brain" behind the host broker. Only Windows has
 * AppContainers. The shim drives the brain (`brain.launch`, `brain.health`,
 * `approval.respond`), but this package does not yet carry the brain's
 * approvals to the CLI, so it reports the tier unavailable and says why
 * instead of denying every level B and C request after a timeout.
 */
export class WindowsAppContainerContext extends ShimRuntimeContext {
  readonly type = 'windows-appcontainer' as const;
  readonly executionEnvironment = 'appcontainer' as const;

  constructor(options: WindowsOptions = {}) {
    super(options.workspacePath && !options.workspace ? { ...options, workspace: options.workspacePath } : options);
  }

  protected tierParams(): Record<string, unknown> {
    return {};
  }

  static async availability(options: WindowsOptions = {}): Promise<Availability> {
    if (process.platform !== 'win32') {
      return { available: false, reason: 'Windows AppContainers exist only on Windows' };
    }
    try {
      locateShim(options.shimPath, options.env ?? process.env);
    } catch (error) {
      return { available: false, reason: (error as ShimNotFound).message };
    }
    return {
      available: false,
      reason:
        "this package does not yet carry the brain's approval requests to the CLI " +
        '(terminai-shim brain launch runs the tier on its own, with its own prompts)',
    };
  }

  override async initialize(): Promise<void> {
    const why = await WindowsAppContainerContext.availability(this.options);
    throw new ShimError('TIER_UNAVAILABLE', `the Windows AppContainer tier is not available: ${why.reason}`);
  }
}
