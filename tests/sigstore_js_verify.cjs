// Verifies one Sigstore bundle with sigstore-js (@sigstore/verify, the code
// npm's own `audit signatures` and provenance checks run), loaded from the
// client's lockfile (clients/node/node_modules), so a release is checked by the
// verifier a Node.js CLI would use, not only by sigstore-python.
//
// Usage: node sigstore_js_verify.cjs CLIENT_DIR JOB_JSON
//   JOB_JSON: {"trustedRoot": path, "bundle": path, "artifact": path | null,
//              "identity": string, "issuer": string}
// Prints one JSON line: {"ok": true, "payload": base64 | null} or
// {"ok": false, "code": ..., "message": ...}; exits 0 only when it verified.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const [clientDir, jobText] = process.argv.slice(2);
const load = createRequire(path.join(clientDir, 'package.json'));
const { Verifier, toSignedEntity, toTrustMaterial } = load('@sigstore/verify');
const { bundleFromJSON } = load('@sigstore/bundle');
const { TrustedRoot } = load('@sigstore/protobuf-specs');

const job = JSON.parse(jobText);
try {
  const root = TrustedRoot.fromJSON(JSON.parse(fs.readFileSync(job.trustedRoot, 'utf8')));
  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(job.bundle, 'utf8')));
  const artifact = job.artifact ? fs.readFileSync(job.artifact) : undefined;
  const verifier = new Verifier(toTrustMaterial(root), { tlogThreshold: 1, ctlogThreshold: 1, timestampThreshold: 1 });
  verifier.verify(toSignedEntity(bundle, artifact), {
    subjectAlternativeName: job.identity,
    extensions: { issuer: job.issuer },
  });
  const envelope = bundle.content.$case === 'dsseEnvelope' ? bundle.content.dsseEnvelope : null;
  const payload = envelope ? Buffer.from(envelope.payload).toString('base64') : null;
  process.stdout.write(JSON.stringify({ ok: true, payload }) + '\n');
} catch (error) {
  process.stdout.write(JSON.stringify({ ok: false, code: error.code ?? error.name, message: String(error.message) }) + '\n');
  process.exitCode = 1;
}
