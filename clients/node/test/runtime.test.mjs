// The package against a real shim and a real isolation tier, as the TerminAI
// CLI uses it. Run by tests/test_node_package.py (`inv test`) with SHIM (the
// shim to use), MANIFEST (a release signed by the local development
// identity), WORKSPACE and BACKEND (qemu or container) set. With SHIM unset
// and RUNTIME set, it runs against the package as npm installed it (RUNTIME:
// its entry point in a project's node_modules), and the shim must be the one
// its per-platform optional dependency brought.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';

const { SHIM, MANIFEST, WORKSPACE, BACKEND, RUNTIME } = process.env;
const { ContainerRuntimeContext, MicroVMRuntimeContext, ShimNotFound, WindowsAppContainerContext, locateShim, platformPackage } =
  await import(RUNTIME ?? '../dist/index.js');
const Tier = BACKEND === 'container' ? ContainerRuntimeContext : MicroVMRuntimeContext;
const options = () => ({ shimPath: SHIM, release: { manifest: MANIFEST }, trust: { dev: true }, workspace: WORKSPACE });

test('isAvailable is a real probe that says why not', async () => {
  const none = { shimPath: undefined, env: { PATH: '/nonexistent' } };
  const why = await MicroVMRuntimeContext.availability(none);
  if (SHIM) {
    assert.equal(why.available, false);
    assert.match(why.reason, /TERMINAI_SHIM \(not set\).*@terminai\/shim-.*terminai-shim on PATH/);
    assert.equal(await MicroVMRuntimeContext.isAvailable(none), false);
  } else { // installed: the optional dependency for this platform is the shim, with nothing on PATH
    const bin = process.platform === 'win32' ? 'terminai-shim.exe' : 'terminai-shim';
    assert.ok(why.shim.endsWith(join('node_modules', ...platformPackage().split('/'), 'bin', bin)), why.shim);
  }
  assert.throws(() => locateShim('/no/such/shim'), ShimNotFound);
  const found = await Tier.availability(options());
  assert.equal(found.available, true, found.reason);
  if (SHIM) assert.equal(found.shim, SHIM);
  const windows = await WindowsAppContainerContext.availability({ shimPath: SHIM });
  assert.equal(windows.available, false);
  assert.match(windows.reason, /Windows/);
  await assert.rejects(new WindowsAppContainerContext({ shimPath: SHIM }).initialize(), /not available/);
});

test('zero arguments, as RuntimeManager builds it: the default release, the working directory, an exact isAvailable', { timeout: 300_000 }, async () => {
  const saved = { cwd: process.cwd(), env: { ...process.env } };
  const config = mkdtempSync(join(tmpdir(), 'terminai-config-'));
  // The developer's trust root stays where `inv release` put it; only the default release's file moves.
  const devRoot = process.env.TERMINAI_DEV_TRUSTED_ROOT
    ?? join(process.env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'terminai', 'dev-trusted-root.json');
  try {
    Object.assign(process.env, { XDG_CONFIG_HOME: config, TERMINAI_DEV_TRUSTED_ROOT: devRoot });
    if (SHIM) process.env.TERMINAI_SHIM = SHIM;
    delete process.env.TERMINAI_RELEASE;
    delete process.env.TERMINAI_RELEASE_STORE;
    process.chdir(WORKSPACE);
    // Nothing configured: isAvailable says no, and initialize fails the same way, naming what to do.
    const none = await Tier.availability();
    assert.deepEqual([none.available, none.code], [false, 'INVALID_CONFIG']);
    assert.match(none.reason, /no default release is configured.*TERMINAI_RELEASE/);
    assert.equal(await Tier.isAvailable(), false);
    await assert.rejects(new Tier().initialize(), /no default release is configured/);
    // A default that does not verify (one byte of its manifest changed): no, before anything boots.
    const forged = join(config, 'forged');
    mkdirSync(forged);
    const manifest = readFileSync(join(MANIFEST, 'manifest.json'), 'utf8');
    assert.match(manifest, /"serial": \d/);
    writeFileSync(join(forged, 'manifest.json'), manifest.replace('"serial": ', '"serial": 1'));
    copyFileSync(join(MANIFEST, 'manifest.json.sigstore.json'), join(forged, 'manifest.json.sigstore.json'));
    mkdirSync(join(config, 'terminai'));
    const defaults = join(config, 'terminai', 'release.json');
    writeFileSync(defaults, JSON.stringify({ manifest: forged, dev: true }));
    const refused = await Tier.availability();
    assert.equal(refused.available, false, refused.reason);
    assert.equal(refused.code, 'VERIFICATION_FAILED', refused.reason);
    await assert.rejects(new Tier().initialize(), { code: 'VERIFICATION_FAILED' });
    // What `inv release` writes for a development release: the zero-argument context boots it.
    writeFileSync(defaults, JSON.stringify({ manifest: MANIFEST, dev: true, writtenBy: 'inv release' }));
    const yes = await Tier.availability();
    assert.equal(yes.available, true, yes.reason);
    assert.equal(await Tier.isAvailable(), true);
    writeFileSync(join(WORKSPACE, 'zero-arg.txt'), 'the project\n');
    const context = new Tier();
    await context.initialize();
    try {
      assert.ok(context.displayName, 'initialize names the tier');
      assert.match(context.pythonPath, /^\/usr\/bin\/python3/, 'initialize says where the guest\'s Python is');
      // ShellExecutionService's call: the project is there, at the path the CLI knows it by.
      const here = await context.execute('pwd && cat zero-arg.txt', { cwd: process.cwd() });
      assert.deepEqual([here.stdout, here.exitCode], [`${WORKSPACE}\nthe project\n`, 0]);
    } finally {
      await context.dispose();
    }
  } finally {
    process.chdir(saved.cwd);
    for (const key of Object.keys(process.env)) if (!(key in saved.env)) delete process.env[key];
    Object.assign(process.env, saved.env);
    rmSync(config, { recursive: true, force: true });
  }
});

test('the CLI acceptance sequence, host paths, concurrency, kill', { timeout: 300_000 }, async () => {
  const events = [];
  const context = new Tier({ ...options(), onEvent: (e) => events.push(e.stage) });
  await context.initialize();
  try {
    assert.deepEqual([context.type, context.executionEnvironment, context.isIsolated],
      BACKEND === 'container' ? ['container', 'container', true] : ['microvm', 'microvm', true]);
    assert.ok(events.includes('verify') && events.includes('boot') && events.at(-1) === 'ready', events.join());
    const health = await context.healthCheck();
    assert.deepEqual(health, { ok: true });
    assert.equal(context.pythonPath, '/usr/bin/python3');
    assert.match(context.taptsVersion, /^\d+\.\d+\.\d+/);

    const echo = await context.execute('echo "Hello from MicroVM"');
    assert.equal(echo.stdout, 'Hello from MicroVM\n');
    assert.equal(echo.exitCode, 0);
    // The release's default profile: its tools layer (git and the rest) in both tiers.
    assert.equal(context.rootfs.profile, 'standard');
    assert.deepEqual(context.rootfs.layers, BACKEND === 'container' ? [] : ['tools']);
    const git = await context.execute('git --version');
    assert.equal(git.exitCode, 0, git.stderr);

    const proc = await context.spawn('python3 -c "import time; print(1, flush=True); time.sleep(0.5); print(2)"');
    const chunks = [];
    proc.stdout.on('data', (chunk) => { assert.ok(Buffer.isBuffer(chunk)); chunks.push(chunk.toString()); });
    const [code, signal] = await new Promise((resolve) => proc.on('close', (c, s) => resolve([c, s])));
    assert.deepEqual([code, signal], [0, null]);
    assert.equal(chunks.join(''), '1\n2\n');
    assert.ok(chunks.length >= 2, `streamed in pieces: ${JSON.stringify(chunks)}`);

    // writing then reading a file, the way the CLI does it
    const file = join(WORKSPACE, 'note.txt');
    assert.equal((await context.execute('sh', { args: ['-c', `echo from the guest > ${file}`] })).exitCode, 0);
    assert.equal(readFileSync(file, 'utf8'), 'from the guest\n');
    assert.equal((await context.execute('cat', { args: [file] })).stdout, 'from the guest\n');

    // host paths as cwd and in arguments work unchanged
    mkdirSync(join(WORKSPACE, 'src'), { recursive: true });
    writeFileSync(join(WORKSPACE, 'src', 'app.py'), 'import os; print(os.getcwd())');
    const here = await context.execute('python3', { args: [join(WORKSPACE, 'src', 'app.py')], cwd: join(WORKSPACE, 'src') });
    assert.equal(here.stdout, `${join(WORKSPACE, 'src')}\n`);
    await assert.rejects(context.execute('pwd', { cwd: '/etc' }), /outside the workspace/);

    // stdin, env, timeout
    const upper = await context.spawn('python3', { args: ['-c', 'import sys, os; print(sys.stdin.read().upper(), os.environ["X"])'], env: { X: 'x', Y: undefined } });
    let out = '';
    upper.stdout.on('data', (c) => { out += c; });
    upper.stdin.end('typed');
    await new Promise((resolve) => upper.on('close', resolve));
    assert.equal(out, 'TYPED x\n');
    const slow = await context.execute('sleep', { args: ['100'], timeout: 500 });
    assert.equal(slow.exitCode, 137);

    // 20 at once
    const many = await Promise.all(Array.from({ length: 20 }, (_, i) => context.execute('sh', { args: ['-c', `sleep 0.2; echo ${i}`] })));
    assert.deepEqual(many.map((r) => r.stdout), Array.from({ length: 20 }, (_, i) => `${i}\n`));

    // kill
    const sleeper = await context.spawn('sleep', { args: ['100'] });
    const ended = new Promise((resolve) => sleeper.on('exit', (c, s) => resolve([c, s])));
    assert.equal(sleeper.kill('SIGTERM'), true);
    assert.deepEqual(await ended, [143, 'SIGTERM']);
    assert.equal(sleeper.kill(), false, 'nothing left to signal');

    // a terminal
    const term = await context.spawn('sh', { args: ['-c', 'test -t 1 && stty size'], pty: { cols: 90, rows: 20 } });
    let screen = '';
    term.stdout.on('data', (c) => { screen += c; });
    await new Promise((resolve) => term.on('close', resolve));
    assert.equal(screen, '20 90\r\n');
  } finally {
    await context.dispose();
  }
});

function tierProcessOf(shimPid) {
  if (BACKEND === 'container') {
    return () => execFileSync('docker', ['kill', ...execFileSync('docker', ['ps', '-q', '--filter', `label=org.terminai.owner-pid=${shimPid}`]).toString().split()]);
  }
  const children = (pid) => readdirSync(`/proc/${pid}/task`).flatMap((t) => readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').split(' ').filter(Boolean));
  const qemu = children(shimPid).find((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('qemu'));
  assert.ok(qemu, 'the shim has a QEMU child');
  return () => process.kill(Number(qemu), 'SIGKILL');
}

test('prewarm keeps a VM waiting, and initialize takes it', { timeout: 300_000 }, async () => {
  const context = new Tier(options());
  await context.prewarm();
  await context.initialize();
  try {
    assert.equal(context.pooled, true);
    const echo = await context.execute('echo "from the pool"');
    assert.equal(echo.stdout, 'from the pool\n');
    assert.deepEqual(await context.healthCheck(), { ok: true });
  } finally {
    await context.dispose();
  }
  const unused = new Tier(options());
  await unused.prewarm();
  await unused.dispose(); // a pool nobody took ends with its context
});

test('the CLI\'s own calls: whole command lines, abort, and the host\'s environment', { timeout: 300_000 }, async () => {
  const context = new Tier(options());
  await context.initialize();
  try {
    // shellExecutionService: the model's whole line, with a cwd, through the guest's /bin/sh
    const line = await context.execute('echo a | tr a b && echo "$(echo sub)" > out.txt; cat out.txt 2>&1', { cwd: WORKSPACE });
    assert.deepEqual([line.stdout, line.exitCode], ['b\nsub\n', 0]);
    assert.equal((await context.execute('exit 3')).exitCode, 3);
    // with args it is an argv: nothing is a shell's
    const literal = await context.execute('echo', { args: ['$(id)', '|', 'tr', '&&', '*'] });
    assert.equal(literal.stdout, '$(id) | tr && *\n');

    // abort: the command's whole group is gone from the guest within a second
    const procs = async (pattern) => (await context.execute(
      `for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '${pattern}' || true`)).stdout.trim();
    const controller = new AbortController();
    const running = context.execute('sh -c "sleep 101 & sleep 102; wait"', { signal: controller.signal });
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.equal(await procs('^sleep 10[12]'), '2');
    const aborted = Date.now();
    controller.abort();
    await assert.rejects(running, { name: 'AbortError' });
    assert.ok(Date.now() - aborted < 1000, `rejected ${Date.now() - aborted} ms after the abort`);
    assert.equal(await procs('^sleep 10[12]'), '0', 'the aborted group is gone from the guest');
    await assert.rejects(context.execute('true', { signal: AbortSignal.abort() }), { name: 'AbortError' });
    const spawnAbort = new AbortController();
    const spawned = await context.spawn('sleep 103', { signal: spawnAbort.signal });
    const errored = new Promise((resolve) => spawned.on('error', resolve));
    const exited = new Promise((resolve) => spawned.on('exit', (c, s) => resolve([c, s])));
    spawnAbort.abort();
    assert.equal((await errored).name, 'AbortError');
    assert.deepEqual(await exited, [137, 'SIGKILL']);

    // grep.ts and mcp-client.ts pass { ...process.env }: the host's secrets and paths stay on the host
    process.env.OPENAI_API_KEY = 'sk-host-secret-that-must-stay-here';
    try {
      const seen = await context.execute('env', { env: { ...process.env, ADDED: 'by the caller', TERM: 'xterm-256color' } });
      assert.doesNotMatch(seen.stdout, /sk-host-secret/);
      assert.match(seen.stdout, /^ADDED=by the caller$/m);
      assert.match(seen.stdout, /^TERM=xterm-256color$/m);
      assert.doesNotMatch(seen.stdout, new RegExp(`^PATH=${process.env.PATH.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));
      const named = await context.execute('env', { env: { ...process.env }, passEnv: ['OPENAI_API_KEY'] });
      assert.match(named.stdout, /^OPENAI_API_KEY=sk-host-secret/m, 'passEnv names what the command needs');
    } finally {
      delete process.env.OPENAI_API_KEY;
    }
  } finally {
    await context.dispose();
  }
});

test('the tier dying mid-command: execute rejects with the cause, the check is unhealthy, dispose still works', { timeout: 300_000 }, async () => {
  const context = new Tier(options());
  await context.initialize();
  const kill = tierProcessOf(context.connection.child.pid);
  const running = context.execute('sleep', { args: ['100'] });
  await new Promise((resolve) => setTimeout(resolve, 1000));
  kill();
  await assert.rejects(running, (error) => {
    assert.match(`${error.code}: ${error.message}`, /VM_GONE|stopped|gone/i);
    return true;
  });
  const health = await context.healthCheck();
  assert.equal(health.ok, false);
  await context.dispose();
});
