// The CLI's own acceptance sequence against the real shim, on a real VM or
// a real container: healthCheck -> execute -> spawn (streamed) -> a spawn on a
// terminal (input, resize, exit) -> write/read a file -> dispose. Run by tests/test_node_client.py with SHIM, MANIFEST (a
// signed release directory, signed by the local development identity),
// WORKSPACE and BACKEND (qemu or container) set.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ShimClient } from './shim-client.mjs';

const { SHIM, MANIFEST, WORKSPACE, BACKEND } = process.env;

test('CLI acceptance sequence', { timeout: 240_000 }, async () => {
  const shim = new ShimClient(SHIM);
  try {
    // The CLI's path: the shim verifies the signed release before it boots it.
    const init = await shim.request('initialize', { manifest: MANIFEST, dev: true, workspace: WORKSPACE, backend: BACKEND });
    assert.equal(init.type, BACKEND === 'container' ? 'container' : 'microvm');
    assert.equal(init.isIsolated, true);
    assert.match(init.displayName, BACKEND === 'container' ? /Container/ : /MicroVM/);

    const health = await shim.request('healthCheck');
    assert.equal(health.ok, true);
    assert.equal(health.pythonPath, '/usr/bin/python3');
    assert.match(health.taptsVersion, /^\d+\.\d+\.\d+/);

    const echo = await shim.request('execute', { command: 'echo "Hello from MicroVM"' });
    assert.deepEqual([echo.stdout, echo.stderr, echo.exitCode], ['Hello from MicroVM\n', '', 0]);

    const withArgs = await shim.request('execute', { command: 'printf', args: ['%s|', 'a b', '$HOME'] });
    assert.equal(withArgs.stdout, 'a b|$HOME|');

    const chunks = [];
    const proc = await shim.spawn('python3', {
      args: ['-u', '-c', 'import sys, time; print("line one"); time.sleep(0.3); print("line two"); print(sys.stdin.read().upper())'],
    });
    proc.on('stdout', (data) => chunks.push(data));
    await proc.write('from stdin');
    await proc.end();
    const code = await proc.done;
    assert.equal(code, 0);
    assert.equal(proc.stdout, 'line one\nline two\nFROM STDIN\n');
    assert.ok(chunks.length >= 2, `output should stream in pieces, got ${JSON.stringify(chunks)}`);

    // An interactive program on a terminal: isatty holds, typed input is read, a resize is seen.
    const term = await shim.spawn('sh', {
      args: ['-c', 'test -t 0 && test -t 1 && stty size && read x && echo "got:$x" && read y && stty size'],
      pty: { cols: 100, rows: 30 },
    });
    const seen = (text) => new Promise((resolve) => {
      const check = () => { if (term.stdout.includes(text)) resolve(); };
      term.on('stdout', check);
      check();
    });
    await seen('30 100');
    await term.write('typed\r');
    await seen('got:typed');
    await term.resize(120, 40);
    await term.write('\r');
    assert.equal(await term.done, 0, term.stdout);
    assert.match(term.stdout, /40 120/);

    await shim.request('fs.writeFile', { path: '/workspace/note.txt', content: 'written through the shim ✓' });
    const read = await shim.request('fs.readFile', { path: '/workspace/note.txt' });
    assert.equal(read.content, 'written through the shim ✓');
    assert.equal(readFileSync(join(WORKSPACE, 'note.txt'), 'utf8'), 'written through the shim ✓');
    writeFileSync(join(WORKSPACE, 'from-host.txt'), 'host side');
    const cat = await shim.request('execute', { command: 'cat', args: ['/workspace/from-host.txt'] });
    assert.equal(cat.stdout, 'host side');

    await assert.rejects(shim.request('no.such.method'), (err) => err.code === 'METHOD_NOT_FOUND');
    await shim.request('dispose');
    const exit = await shim.exited;
    assert.equal(exit.code, 0, shim.stderr);
  } finally {
    shim.child.kill('SIGKILL');
  }
});
