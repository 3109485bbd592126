// A stand-in for the CLI's brain logic, loaded by agent-brain.js inside a
// signed bundle: one request at each level, then the outcomes written into
// the workspace (a level A write) for tests/node/brain-approvals.test.mjs.
'use strict';

module.exports = async (api) => {
  const outcome = (p) => p.then((r) => ({ ok: true, stdout: r.stdout }), (e) => ({ ok: false, code: e.code }));
  const result = {
    levelA: await outcome(api.request('execute', { command: 'echo', args: ['level-a'] })),
    allowed: await outcome(api.request('execute', { command: 'python3', args: ['-c', 'print(41 + 1)'] })),
    denied: await outcome(api.request('execute', { command: 'env', args: ['sh', '-c', 'echo should-not-run'] })),
    expired: await outcome(api.request('execute', { command: 'git', args: ['--version'] })),
    outside: await outcome(api.request('readFile', { path: '/etc/hostname' })),
  };
  await api.request('writeFile', { path: 'brain-result.json', content: JSON.stringify(result) });
};
