// The live board: tickers in volatile rooms (`ticker:*`, datagrams on WebTransport) and an
// order board in a reliable room (`orders:board`). Served by `roomcast serve --dev-ui
// examples/browser`, which also serves /dev-ui.js with the certificate hash to pin.
//
// URL parameters: `?broker=http://host:port` (default: this page's origin),
// `?transport=websocket` (skip WebTransport).

import { connect } from './vendor/roomcast-client.js';

const SYMBOLS = ['BTC-EUR', 'ETH-EUR', 'SOL-EUR', 'ADA-EUR'];
const params = new URLSearchParams(location.search);
const broker = params.get('broker') ?? location.origin;

const $ = (id) => document.getElementById(id);
const fmt = (n, digits = 2) =>
  typeof n === 'number' ? n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits }) : '–';

/** The certificate hash from the broker serving this page (`/dev-ui.js`), if it has one. */
async function devCertHash() {
  try {
    const module = await import(new URL('/dev-ui.js', broker).href);
    return module.certHash ?? undefined;
  } catch {
    return undefined; // not served by `--dev-ui`: WebTransport needs a trusted certificate
  }
}

function setConnection(state) {
  const badge = $('connection');
  badge.dataset.state = state.state;
  if (state.transport) badge.dataset.transport = state.transport;
  if (state.state === 'connected') badge.textContent = `connected · ${state.transport} · session ${state.session}`;
  else if (state.state === 'connecting') badge.textContent = `connecting · ${state.transport}…`;
  else if (state.state === 'disconnected') badge.textContent = `disconnected · ${state.code} ${state.reason}`;
  else if (state.state === 'reconnecting') badge.textContent = `reconnecting in ${state.delay} ms (attempt ${state.attempt + 1})`;
  else badge.textContent = `closed · ${state.code} ${state.reason}`;
}

/** After a reconnect: whether the order board missed events (the client resubscribed it). */
function onBoardRecovery(r) {
  const li = document.createElement('li');
  li.className = 'notice';
  li.textContent =
    r.status === 'recovered'
      ? `${r.room}: reconnected, missed events replayed from #${r.previous.seq}`
      : `${r.room}: ${r.status} — events since #${r.previous?.seq ?? '?'} are lost, the board may be stale`;
  $('log').prepend(li);
}

function log(e) {
  const li = document.createElement('li');
  li.innerHTML = `<span class="via"></span> `;
  li.firstChild.textContent = e.via.padEnd(8);
  li.append(`${e.room} #${e.seq} ${e.event} ${JSON.stringify(e.data)}`);
  const list = $('log');
  list.prepend(li);
  while (list.children.length > 8) list.lastChild.remove();
}

// ---- tickers -------------------------------------------------------------------------------

const tickers = new Map();

function tickerCard(symbol) {
  const card = document.createElement('div');
  card.className = 'ticker';
  card.id = `ticker-${symbol}`;
  card.innerHTML = `
    <div class="symbol"><span>${symbol}</span><span class="change"></span></div>
    <div class="price">–</div>
    <div class="quote">bid <b class="bid">–</b> · ask <b class="ask">–</b></div>
    <svg viewBox="0 0 100 36" preserveAspectRatio="none"><polyline points=""/></svg>
    <div class="meta">waiting for ticks…</div>`;
  $('tickers').append(card);
  const state = { card, history: [], first: undefined, updates: 0 };
  tickers.set(symbol, state);
  return state;
}

function onTick(symbol, e) {
  const t = tickers.get(symbol);
  const { last, bid, ask } = e.data;
  const price = t.card.querySelector('.price');
  const previous = t.history.at(-1);
  price.textContent = fmt(last);
  price.className = `price ${previous === undefined || last === previous ? '' : last > previous ? 'up' : 'down'}`;
  t.first ??= last;
  const change = ((last - t.first) / t.first) * 100;
  const changeEl = t.card.querySelector('.change');
  changeEl.textContent = `${change >= 0 ? '+' : ''}${change.toFixed(2)}%`;
  changeEl.style.color = change >= 0 ? 'var(--up)' : 'var(--down)';
  t.card.querySelector('.bid').textContent = fmt(bid);
  t.card.querySelector('.ask').textContent = fmt(ask);
  t.history.push(last);
  if (t.history.length > 40) t.history.shift();
  const lo = Math.min(...t.history);
  const hi = Math.max(...t.history);
  const points = t.history.map((p, i) => `${(i / 39) * 100},${34 - ((p - lo) / (hi - lo || 1)) * 32}`);
  t.card.querySelector('polyline').setAttribute('points', points.join(' '));
  t.updates++;
  t.card.querySelector('.meta').textContent = `seq ${e.seq} · via ${e.via} · ${t.updates} updates`;
  t.card.dataset.seq = e.seq;
  t.card.dataset.via = e.via;
}

// ---- order board ---------------------------------------------------------------------------

function onOrder(e) {
  const order = e.data;
  let row = document.getElementById(`order-${order.id}`);
  if (e.event === 'new') {
    if (!row) {
      row = document.createElement('tr');
      row.id = `order-${order.id}`;
      $('orders').prepend(row);
    }
    row.innerHTML = `<td></td><td class="${order.side}"></td><td></td><td></td><td></td><td><span class="status"></span></td><td></td>`;
    const cells = row.children;
    cells[0].textContent = order.id;
    cells[1].textContent = order.side;
    cells[2].textContent = order.symbol;
    cells[3].textContent = fmt(order.qty, 2);
    cells[4].textContent = fmt(order.price);
  }
  if (!row) return; // a status for an order placed before this page subscribed
  const status = row.querySelector('.status');
  status.textContent = order.status ?? 'open';
  status.className = `status ${order.status ?? 'open'}`;
  row.children[6].textContent = e.seq;
  const rows = $('orders');
  while (rows.children.length > 10) rows.lastChild.remove();
}

// ---- connection ----------------------------------------------------------------------------

async function run() {
  for (const symbol of SYMBOLS) {
    tickerCard(symbol);
    $('order-form').symbol.append(new Option(symbol, symbol));
  }
  const certHash = await devCertHash();
  const transports = params.get('transport') === 'websocket' ? ['websocket'] : undefined;
  // The client reconnects and resubscribes by itself; this loop only retries a first connect
  // that failed, or starts over after the client stopped for good (e.g. an unauthorized close).
  for (let delay = 500; ; delay = Math.min(delay * 2, 10000)) {
    try {
      const client = await connect(broker, { certHash, transports, onState: setConnection });
      window.roomcastClient = client; // for the browser tests and the console
      delay = 500;
      await Promise.all([
        ...SYMBOLS.map((s) => client.subscribe(`ticker:${s}`, (e) => (onTick(s, e), log(e)))),
        client.subscribe('orders:board', (e) => (onOrder(e), log(e)), { onRecovery: onBoardRecovery }),
      ]);
      document.body.dataset.ready = 'true';
      wireForm(client);
      await client.closed; // settles only when the client stopped for good
    } catch (e) {
      console.warn('roomcast:', e.message);
    }
    await new Promise((r) => setTimeout(r, delay));
  }
}

let formClient;
function wireForm(client) {
  formClient = client;
  const form = $('order-form');
  if (form.dataset.wired) return;
  form.dataset.wired = 'true';
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const result = $('order-result');
    const symbol = form.symbol.value;
    const last = tickers.get(symbol).history.at(-1);
    const order = {
      id: `W-${Math.random().toString(36).slice(2, 7).toUpperCase()}`,
      symbol,
      side: form.side.value,
      qty: Number(form.qty.value),
      price: Number(form.price.value) || last || 0,
    };
    try {
      // Idempotent: if the connection drops before the Ack, the client sends it again after
      // reconnecting and the broker still places the order once.
      const ack = await formClient.publish('orders:board', 'new', order, { idempotent: true });
      result.className = 'result';
      result.textContent = `placed ${order.id} · ack seq ${ack.seq ?? '–'}`;
    } catch (e) {
      result.className = 'result error';
      result.textContent = `refused: ${e.codeName ?? ''} ${e.message}`;
    }
  });
}

run();
