// A stand-in for the CLI's bundled brain logic, loaded by agent-brain.js after
// the handshake: hundreds of requests in flight at once, each answer checked
// against its own request, then the policy's refusals and a file round trip.
'use strict';

module.exports = async (api) => {
  const n = Number(process.env.BRAIN_TEST_N || 300);
  const results = await Promise.all(Array.from({ length: n }, (_, i) => (i % 3 === 0
    ? api.request('ping').then((r) => ({ i, ok: r.pong === true }))
    : api.request('execute', { command: 'echo', args: [`req-${i}`] }).then((r) => ({ i, ok: r.stdout === `req-${i}\n` })))));
  const crossed = results.filter((r) => !r.ok).length;
  const code = (p) => p.then(() => 'allowed', (e) => e.code);
  const shell = await code(api.request('execute', { command: 'echo hi', mode: 'shell' }));
  const shellByArgv = await code(api.request('execute', { command: '/bin/sh', args: ['-c', 'echo hi'] }));
  const outside = await code(api.request('readFile', { path: '/etc/hostname' }));
  const escape = await code(api.request('writeFile', { path: '../escape.txt', content: 'x' }));
  await api.request('writeFile', { path: 'notes/from-brain.txt', content: 'written by the brain', createDirs: true });
  const back = await api.request('readFile', { path: 'notes/from-brain.txt' });
  const listing = await api.request('listDir', { path: 'notes' });
  const timedOut = await api.request('execute', { command: 'sleep', args: ['30'], timeout: 300 });
  process.stdout.write(JSON.stringify({
    n: results.length, crossed, shell, shellByArgv, outside, escape, back: back.content,
    listing: listing.entries.map((e) => e.name), timedOut: timedOut.timedOut,
  }) + '\n');
  api.exit(0);
};
