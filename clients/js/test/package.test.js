// The packaged forms: require() gets the CommonJS build, the minified
// module exports the same names, and package.json says there are no side
// effects.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

import * as esm from '../herald.js';

const require = createRequire(import.meta.url);

test('CommonJS, ESM and the minified build export the same API', async () => {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url)));
  assert.equal(pkg.sideEffects, false);
  const cjs = require('herald-client');
  const min = await import('herald-client/min');
  const names = Object.keys(esm).sort();
  assert.deepEqual(Object.keys(cjs).filter((k) => k !== '__esModule').sort(), names);
  assert.deepEqual(Object.keys(min).sort(), names);
  assert.ok(cjs.matches('a:*', 'a:b') && min.matches('a:>', 'a:b:c'));
  assert.ok(new cjs.HeraldError('x', 'y') instanceof Error);
  assert.ok(readFileSync(new URL('../dist/herald.min.js', import.meta.url)).length < readFileSync(new URL('../herald.js', import.meta.url)).length / 2);
});
