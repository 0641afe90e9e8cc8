// Takes docs/img/browser-demo.png: a broker with `--dev-ui examples/browser`, the feeder
// (examples/browser/feed.sh) for a few seconds, one order placed through the page's form.
//
//   node scripts/screenshot-demo.js      (needs the debug binaries and /usr/bin/chromium)

import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

import { REPO_DIR, binDir, launchChromium, startBroker, stopAll } from '../test/browser/harness.js';

const OUT = join(REPO_DIR, 'docs', 'img', 'browser-demo.png');

const broker = await startBroker(['--dev-ui', join(REPO_DIR, 'examples', 'browser'), '--volatile-namespaces', 'ticker']);
const browser = await launchChromium();
try {
  const page = await browser.newPage({ viewport: { width: 1180, height: 900 } });
  await page.goto(`${broker.http}/`);
  await page.waitForSelector('body[data-ready="true"]');
  const feed = spawn(join(REPO_DIR, 'examples', 'browser', 'feed.sh'), [broker.ws], {
    env: { ...process.env, FEED_COUNT: '24', FEED_INTERVAL: '0.15', ROOMCAST_CLI: join(binDir(), 'roomcast-cli') },
    stdio: 'inherit',
  });
  await new Promise((resolve, reject) => feed.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`feed.sh: ${code}`)))));
  await page.selectOption('select[name="symbol"]', 'ETH-EUR');
  await page.fill('input[name="qty"]', '2.5');
  await page.click('button[type="submit"]');
  await page.waitForSelector('#order-result:has-text("ack seq")');
  mkdirSync(join(REPO_DIR, 'docs', 'img'), { recursive: true });
  await page.screenshot({ path: OUT, fullPage: true });
  console.log(`wrote ${OUT}`);
} finally {
  await browser.close();
  await stopAll();
}
