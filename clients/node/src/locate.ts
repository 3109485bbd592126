// Where the shim is: an explicit path, TERMINAI_SHIM, the per-platform
// package that installed with this one (an optional dependency), then PATH.
import { accessSync, constants, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { delimiter, dirname, join } from 'node:path';
import { ShimNotFound } from './errors.js';

const EXECUTABLE = process.platform === 'win32' ? 'terminai-shim.exe' : 'terminai-shim';

function runnable(path: string): boolean {
  try {
    if (!statSync(path).isFile()) return false;
    if (process.platform !== 'win32') accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The per-platform package's name for this machine, e.g. `@terminai/shim-linux-x64`. */
export function platformPackage(platform: string = process.platform, arch: string = process.arch): string {
  return `@terminai/shim-${platform}-${arch}`;
}

export function locateShim(explicit?: string, env: NodeJS.ProcessEnv = process.env): string {
  const tried: string[] = [];
  if (explicit) {
    if (runnable(explicit)) return explicit;
    tried.push(`the path given (${explicit})`);
    throw new ShimNotFound(tried); // an explicit choice is never silently replaced
  }
  const fromEnv = env['TERMINAI_SHIM'];
  if (fromEnv) {
    if (runnable(fromEnv)) return fromEnv;
    tried.push(`TERMINAI_SHIM (${fromEnv})`);
  } else {
    tried.push('TERMINAI_SHIM (not set)');
  }
  const pkg = platformPackage();
  try {
    const manifest = createRequire(import.meta.url).resolve(`${pkg}/package.json`);
    const candidate = join(dirname(manifest), 'bin', EXECUTABLE);
    if (runnable(candidate)) return candidate;
    tried.push(`${pkg} (no runnable ${candidate})`);
  } catch {
    tried.push(`${pkg} (not installed)`);
  }
  for (const dir of (env['PATH'] ?? '').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, EXECUTABLE);
    if (runnable(candidate)) return candidate;
  }
  tried.push(`${EXECUTABLE} on PATH`);
  throw new ShimNotFound(tried);
}
