// The Windows tier's approval round trip as the TerminAI CLI drives it:
// `terminai-shim serve`, `brain.launch` of a signed bundle, and an answer to
// every `approval.request` the broker sends (allow, deny, or none: it
// expires). Run by tests/test_broker_policy.py with SHIM, BUNDLE, SIGNATURE,
// TRUSTED_ROOT and WORKSPACE set.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const { SHIM, BUNDLE, SIGNATURE, TRUSTED_ROOT, WORKSPACE } = process.env;

test('level A runs, B and C wait for the CLI: allowed, denied, expired', { timeout: 120_000 }, async () => {
  const shim = spawn(SHIM, ['serve'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  shim.stderr.on('data', (chunk) => { stderr += chunk; });
  const pending = new Map();
  const asked = [];
  const expired = [];
  let nextId = 1;
  const call = (method, params = {}) => new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    shim.stdin.write(JSON.stringify({ id, method, params }) + '\n');
  });
  createInterface({ input: shim.stdout }).on('line', (line) => {
    const msg = JSON.parse(line);
    if (msg.method === 'approval.request') {
      asked.push(msg.params);
      const { approvalId, subject } = msg.params;
      if (subject === 'python3') call('approval.respond', { approvalId, allow: true });
      else if (subject === 'sh') call('approval.respond', { approvalId, allow: false });
      // anything else gets no answer: the broker's timeout denies it
    } else if (msg.method === 'approval.expired') {
      expired.push(msg.params.approvalId);
    } else if (pending.has(msg.id)) {
      const { resolve, reject } = pending.get(msg.id);
      pending.delete(msg.id);
      if (msg.error) reject(Object.assign(new Error(msg.error.message), msg.error));
      else resolve(msg.result);
    }
  });
  try {
    const launched = await call('brain.launch', {
      bundle: BUNDLE, signature: SIGNATURE, dev: true, trustedRoot: TRUSTED_ROOT, workspace: WORKSPACE,
      approvalTimeoutMs: 1500,
    });
    assert.equal(launched.isolation, 'none'); // off Windows the brain is a plain process, and says so
    const resultFile = join(WORKSPACE, 'brain-result.json');
    for (let i = 0; i < 400 && !existsSync(resultFile); i++) await new Promise((r) => setTimeout(r, 100));
    const result = JSON.parse(readFileSync(resultFile, 'utf8'));
    assert.deepEqual(result.levelA, { ok: true, stdout: 'level-a\n' });
    assert.deepEqual(result.allowed, { ok: true, stdout: '42\n' });
    assert.deepEqual(result.denied, { ok: false, code: 'APPROVAL_DENIED' });
    assert.deepEqual(result.expired, { ok: false, code: 'APPROVAL_DENIED' });
    assert.deepEqual(result.outside, { ok: false, code: 'POLICY_DENIED' });
    assert.deepEqual(asked.map((a) => [a.level, a.subject]), [['C', 'python3'], ['C', 'sh'], ['B', 'git']]);
    assert.deepEqual(expired, [asked[2].approvalId]);
    assert.ok(asked.every((a) => a.timeoutMs === 1500 && a.summary.length > 0));
    const health = await call('brain.health');
    assert.equal(health.ok, true);
    await assert.rejects(call('approval.respond', { approvalId: asked[2].approvalId, allow: true }), /no open approval/);
    await call('dispose');
  } finally {
    shim.stdin.end();
    await new Promise((resolve) => shim.once('exit', resolve));
  }
  const decisions = stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l))
    .filter((r) => r.event === 'decision');
  assert.deepEqual(decisions.slice(0, 5).map((r) => [r.level, r.approval, r.allowed]), [
    ['A', 'none', true], ['C', 'allowed', true], ['C', 'denied', false], ['B', 'timeout', false], [null, 'none', false],
  ]);
  assert.ok(decisions.every((r) => r.session && r.runtime === 'brain' && r.isolation === 'none'), stderr);
});
