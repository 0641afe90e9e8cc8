// Test harness for the real-browser suite and the demo screenshot: starts `roomcast` brokers on
// 127.0.0.1 port 0 (the real port is read from the broker's log), a static file server on
// port 0 for the test page and the package sources, and Debian's Chromium through
// playwright-core. Everything it starts is stopped by `stopAll()` (and on process exit).

import { spawn } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createTcpServer, connect as tcpConnect } from 'node:net';
import { dirname, extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const REPO_DIR = resolve(PACKAGE_DIR, '../..');

/** Where Debian's chromium lives; `CHROMIUM` overrides. */
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

/**
 * Flags that work headless on these machines (QUIC stays on: WebTransport needs it).
 * playwright-core adds `--headless` and a fresh `--user-data-dir` of its own at every launch.
 */
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const children = new Set();
const servers = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

/** The folder holding the `roomcast` and `roomcast-cli` binaries (`ROOMCAST_BIN_DIR` overrides). */
export function binDir() {
  const dir =
    process.env.ROOMCAST_BIN_DIR ??
    join(process.env.CARGO_TARGET_DIR ? resolve(REPO_DIR, process.env.CARGO_TARGET_DIR) : join(REPO_DIR, 'target'), 'debug');
  for (const bin of ['roomcast', 'roomcast-cli']) {
    if (!existsSync(join(dir, bin))) {
      throw new Error(
        `${join(dir, bin)} is missing: build it first with ` +
          '`cargo build -p roomcast-broker --bin roomcast && cargo build -p roomcast-client --bin roomcast-cli` ' +
          '(or set ROOMCAST_BIN_DIR)',
      );
    }
  }
  return dir;
}

/** Fails (never skips) when Chromium is missing, with the way to install it. */
export function requireChromium() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `${CHROMIUM} not found: install Debian's Chromium with \`apt-get install -y chromium\` ` +
        '(./scripts/test does this), or point CHROMIUM at a Chromium binary. ' +
        'Nothing here downloads a browser.',
    );
  }
  return CHROMIUM;
}

/**
 * Starts `roomcast serve --listen 127.0.0.1:0 ARGS…` and resolves once it listens, with its
 * URLs and (when WebTransport is on) the development certificate's hash from `/cert-hash`.
 */
export async function startBroker(args = [], { webtransport = !args.includes('--no-webtransport') } = {}) {
  const bin = join(binDir(), 'roomcast');
  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ROOMCAST_LOG: process.env.ROOMCAST_LOG ?? 'info', NO_COLOR: '1' },
  });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let log = '';
  const port = await new Promise((resolvePort, reject) => {
    const timer = setTimeout(() => reject(new Error(`broker did not start within 20 s; log:\n${log}`)), 20000);
    child.on('exit', (code) => reject(new Error(`broker exited with ${code}; log:\n${log}`)));
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      log += chunk;
      const ws = /listening: WebSocket ws:\/\/127\.0\.0\.1:(\d+)\/ws/.exec(log);
      const wt = /listening: WebTransport https:\/\/127\.0\.0\.1:(\d+)\/wt/.exec(log);
      if (ws && (!webtransport || wt)) {
        clearTimeout(timer);
        resolvePort(Number(ws[1]));
      }
    });
  });
  const http = `http://127.0.0.1:${port}`;
  let certHash;
  if (webtransport) {
    const response = await fetch(`${http}/cert-hash`);
    if (!response.ok) throw new Error(`/cert-hash answered ${response.status}`);
    const json = await response.json();
    if (json.algorithm !== 'sha-256' || !/^[0-9a-f]{64}$/.test(json.hex)) throw new Error(`bad /cert-hash: ${JSON.stringify(json)}`);
    certHash = json.hex;
  }
  return {
    port,
    http,
    ws: `ws://127.0.0.1:${port}/ws`,
    wt: `https://127.0.0.1:${port}/wt`,
    certHash,
    log: () => log,
    stop: () => stop(child),
    /** SIGKILL: the process dies without closing its sessions. */
    kill: () => kill(child),
  };
}

function kill(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => {
    child.once('exit', () => done());
    child.kill('SIGKILL');
  });
}

function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    child.once('exit', () => {
      clearTimeout(timer);
      done();
    });
    child.kill('SIGTERM');
  });
}

/**
 * Runs `roomcast-cli ARGS…` to completion: `{code, stdout, stderr}`. With `onStderr`, each
 * chunk of stderr is passed on as it arrives (to see `subscribed ROOM at seq N`).
 */
export function cli(args, { onStderr, timeoutMs = 20000 } = {}) {
  const child = spawn(join(binDir(), 'roomcast-cli'), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c) => {
    stderr += c;
    onStderr?.(stderr);
  });
  const done = new Promise((resolveDone, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`roomcast-cli ${args.join(' ')} did not finish in ${timeoutMs} ms; stderr: ${stderr}`));
    }, timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      children.delete(child);
      resolveDone({ code, stdout, stderr });
    });
  });
  return { child, done };
}

/** `roomcast-cli pub URL ROOM EVENT JSON`, which must succeed. */
export async function cliPublish(url, room, event, value, extra = []) {
  const { done } = cli(['pub', url, room, event, JSON.stringify(value), ...extra]);
  const result = await done;
  if (result.code !== 0) throw new Error(`roomcast-cli pub failed (${result.code}): ${result.stderr}`);
  return result;
}

/**
 * `roomcast-cli sub URL ROOM --count N` started in the background; `ready` resolves once it is
 * subscribed, `done` with its output.
 */
export function cliSubscribe(url, room, count, extra = []) {
  let ready;
  const subscribed = new Promise((r) => (ready = r));
  const run = cli(['sub', url, room, '--count', String(count), ...extra], {
    onStderr: (stderr) => {
      if (stderr.includes(`subscribed ${room} at seq`)) ready();
    },
  });
  run.done.then(ready);
  return { ready: subscribed, done: run.done };
}

/**
 * A TCP proxy on 127.0.0.1 port 0 in front of `targetPort` (a broker's WebSocket listener), to
 * take a page's connection away without stopping the broker:
 *
 * - `cut()` destroys every proxied connection (the page sees its WebSocket close without a
 *   `Close` frame);
 * - `refuse(true)` makes new connections fail at once until `refuse(false)`;
 * - `blackhole(true)` stops forwarding what the broker sends (it is dropped), so requests reach
 *   the broker but their replies never reach the page; meant to be followed by `cut()`;
 * - `connections()` counts the connections accepted so far.
 */
export async function startTcpProxy(targetPort) {
  const sockets = new Set();
  let refusing = false;
  let dropping = false;
  let accepted = 0;
  const server = createTcpServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    accepted++;
    const upstream = tcpConnect(targetPort, '127.0.0.1');
    sockets.add(client).add(upstream);
    const gone = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('data', (chunk) => upstream.write(chunk));
    upstream.on('data', (chunk) => {
      if (!dropping) client.write(chunk);
    });
    for (const socket of [client, upstream]) {
      socket.on('error', gone);
      socket.on('close', gone);
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  servers.add(server);
  const port = server.address().port;
  return {
    port,
    http: `http://127.0.0.1:${port}`,
    cut() {
      for (const socket of sockets) socket.destroy();
      sockets.clear();
    },
    refuse(on) {
      refusing = on;
    },
    blackhole(on) {
      dropping = on;
    },
    connections: () => accepted,
    close() {
      this.cut();
      server.close();
      servers.delete(server);
    },
  };
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css', '.png': 'image/png' };

/**
 * Serves `routes` (URL prefix → folder) and `pages` (path → HTML text) on 127.0.0.1 port 0;
 * resolves with the server's base URL.
 */
export async function startStaticServer(routes, pages = {}) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    if (pages[path] !== undefined) {
      res.writeHead(200, { 'content-type': TYPES['.html'], 'cache-control': 'no-store' });
      res.end(pages[path]);
      return;
    }
    for (const [prefix, folder] of Object.entries(routes)) {
      if (!path.startsWith(prefix)) continue;
      const file = normalize(join(folder, path.slice(prefix.length)));
      if (!file.startsWith(folder + sep) || !existsSync(file) || !statSync(file).isFile()) break;
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
      res.end(readFileSync(file));
      return;
    }
    res.writeHead(404).end('not found\n');
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  servers.add(server);
  return `http://127.0.0.1:${server.address().port}`;
}

/** The import map that lets a page load the package from source (`/src/…`, `/cbor-x/…`). */
export const IMPORT_MAP = JSON.stringify({ imports: { 'cbor-x': '/cbor-x/index.js', '@roomcast/client': '/src/index.js' } });

/** Serves the package sources and cbor-x so test pages can `import '@roomcast/client'`. */
export function startPackageServer() {
  const page = `<!doctype html><meta charset="utf-8"><title>roomcast test</title><link rel="icon" href="data:,">
<script type="importmap">${IMPORT_MAP}</script>
<script type="module">
  import * as roomcast from '@roomcast/client';
  window.roomcast = roomcast;
  document.title = 'ready';
</script>`;
  return startStaticServer(
    { '/src/': join(PACKAGE_DIR, 'src'), '/cbor-x/': join(PACKAGE_DIR, 'node_modules', 'cbor-x') },
    { '/': page, '/index.html': page },
  );
}

/** Launches headless Chromium with a fresh profile (playwright-core makes a new one per launch). */
export async function launchChromium() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({ executablePath: requireChromium(), headless: true, args: CHROMIUM_ARGS });
}

/** Stops every server this module started. */
export async function stopAll() {
  for (const server of servers) server.close();
  servers.clear();
  await Promise.all([...children].map((child) => stop(child)));
}
