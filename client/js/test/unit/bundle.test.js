// The demo page's bundle (examples/browser/vendor/roomcast-client.js) is committed so the demo
// runs without npm; it must be what `npm run build:demo` makes from the current sources.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { OUT, bundle } from '../../scripts/build-demo.js';

test('the committed demo bundle is built from the current sources', async () => {
  const fresh = await bundle();
  const committed = readFileSync(OUT, 'utf8');
  assert.ok(committed === fresh, `${OUT} is out of date: run \`npm run build:demo\` in client/js`);
});
