// The SDK against a real herald process, with the `ws` package as the
// WebSocket implementation (Node 20 has none built in).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { Herald, HeraldError, matches, isTerminal, tokenExpiry } from '../herald.js';
import { Node, until, next, sleep, mintToken, HMAC_KEY } from './harness.js';

const nodes = [];
const clients = [];
after(async () => {
  for (const c of clients) c.close();
  for (const n of nodes) {
    n.cont();
    await n.kill();
  }
});

async function node(args) {
  const n = await Node.start(args);
  nodes.push(n);
  return n;
}

function client(url, options = {}) {
  const h = new Herald(url, { WebSocket, minReconnectDelay: 50, maxReconnectDelay: 300, ...options });
  clients.push(h);
  return h;
}

function collector() {
  const got = [];
  const fn = (data, topic) => got.push({ data, topic });
  return { got, fn };
}

test('topic matching and terminal codes', () => {
  assert.ok(matches('todo:*', 'todo:count'));
  assert.ok(!matches('todo:*', 'todo:a:b'));
  assert.ok(matches('chat:>', 'chat:a:b'));
  assert.ok(!matches('chat:>', 'chat'));
  assert.ok(matches('a', 'a'));
  assert.ok(!matches('a', 'a:b'));
  assert.ok(isTerminal(1009) && isTerminal(4500) && isTerminal(1002));
  assert.ok(!isTerminal(1001) && !isTerminal(1006) && !isTerminal(4001));
});

test('subscribe, publish with ack, several handlers, unsubscribe', async () => {
  const n = await node([]);
  const h = client(n.url);
  await next(h, 'open');
  const a = collector();
  const b = collector();
  const offA = h.subscribe('todo:*', a.fn);
  h.subscribe('todo:count', b.fn);
  await sleep(100);
  await h.publish('todo:count', { n: 1 });
  await n.publish('todo:other', 'x');
  await until('deliveries', () => a.got.length === 2 && b.got.length === 1);
  assert.deepEqual(a.got[0], { data: { n: 1 }, topic: 'todo:count' });
  assert.deepEqual(b.got[0], { data: { n: 1 }, topic: 'todo:count' });
  offA();
  await sleep(100);
  await h.publish('todo:count', 2);
  await until('b gets 2', () => b.got.length === 2);
  assert.equal(a.got.length, 2);
  await assert.rejects(h.publish('todo:*', 1), (e) => e instanceof HeraldError && e.code === 'bad_topic');
});

test('reconnects, resubscribes, and sends what was published while down', async () => {
  const n = await node([]);
  const h = client(n.url);
  const c = collector();
  h.subscribe('room', c.fn);
  await next(h, 'open');
  await sleep(100);
  await n.kill();
  await until('reconnecting', () => h.state === 'reconnecting');
  const queued = h.publish('room', 'sent while down');
  await n.restart();
  await until('open again', () => h.state === 'open');
  await queued;
  await until('queued publish delivered', () => c.got.some((m) => m.data === 'sent while down'));
  await n.publish('room', 'after');
  await until('resubscribed', () => c.got.some((m) => m.data === 'after'));
});

test('the queue for publishes while down is bounded: rejected, not dropped', async () => {
  const n = await node([]);
  const h = client(n.url, { maxQueue: 2 });
  await next(h, 'open');
  await n.kill();
  await until('reconnecting', () => h.state === 'reconnecting');
  const ok1 = h.publish('t', 1);
  const ok2 = h.publish('t', 2);
  await assert.rejects(h.publish('t', 3), (e) => e.code === 'queue_full');
  await n.restart();
  await Promise.all([ok1, ok2]);
});

test('a terminal close code stops reconnecting', async () => {
  const n = await node(['--max-message-bytes', '1024']);
  const h = client(n.url);
  await next(h, 'open');
  const closed = next(h, 'closed');
  h.publish('t', 'x'.repeat(5000)).catch(() => {});
  const e = await closed;
  assert.equal(e.detail.code, 1009);
  await sleep(500);
  assert.equal(h.state, 'closed');
  await assert.rejects(h.publish('t', 1), (err) => err.code === 'closed');
});

test('the heartbeat notices a node that stops answering, and recovers', async () => {
  const n = await node([]);
  const h = client(n.url, { heartbeatInterval: 100, heartbeatTimeout: 600 });
  const c = collector();
  h.subscribe('hb', c.fn);
  await next(h, 'open');
  n.stop();
  const lost = await next(h, 'reconnecting');
  assert.equal(lost.detail.code, 4002);
  n.cont();
  await until('open again', () => h.state === 'open');
  await sleep(100);
  await n.publish('hb', 'alive');
  await until('delivered after recovery', () => c.got.some((m) => m.data === 'alive'));
});

test('presence notices reach presence handlers', async () => {
  const n = await node(['--presence', 'chat:*']);
  const a = client(n.url);
  const seen = [];
  a.presence('chat:lobby', (p, topic) => seen.push({ ...p, topic }));
  await next(a, 'open');
  await sleep(100);
  const b = client(`${n.url}?name=bob`);
  b.subscribe('chat:lobby', () => {});
  await until('join seen', () => seen.some((p) => p.event === 'join' && p.name === 'bob'));
  b.close();
  await until('leave seen', () => seen.some((p) => p.event === 'leave' && p.name === 'bob'));
  assert.equal(seen.at(-1).topic, 'chat:lobby');
});

test('close() from a reconnecting listener stops the client for good', async () => {
  const n = await node([]);
  const h = client(n.url);
  await next(h, 'open');
  let tries = 0;
  h.addEventListener('reconnecting', () => {
    tries += 1;
    h.close(); // "give up after N tries", with N = 1
  });
  const opens = [];
  h.addEventListener('open', () => opens.push(Date.now()));
  await n.kill();
  await until('closed', () => h.state === 'closed');
  await n.restart();
  await sleep(800); // several backoff periods at 50..300 ms
  assert.equal(tries, 1);
  assert.deepEqual(opens, [], 'a closed client connected again');
  assert.equal(h.state, 'closed');
});

test('after a reconnect, resubscribes and queued publishes precede what an open listener sends', async () => {
  const n = await node([]);
  // The client watches its own topic: the node delivers to it only what it
  // publishes after its resubscribe, in the order it sent them.
  const h = client(n.url);
  const seen = collector();
  h.subscribe('order', seen.fn);
  await next(h, 'open');
  await sleep(100);
  await n.kill();
  await until('reconnecting', () => h.state === 'reconnecting');
  const queued = h.publish('order', 'queued while down');
  const fromOpen = new Promise((resolve) => {
    h.addEventListener('open', () => resolve(h.publish('order', 'from the open listener')), { once: true });
  });
  await n.restart();
  await queued;
  await fromOpen;
  await until('both delivered', () => seen.got.length >= 2);
  assert.deepEqual(
    seen.got.map((m) => m.data),
    ['queued while down', 'from the open listener'],
  );
});

test('close() rejects publishes still waiting for their ack', async () => {
  const n = await node([]);
  const h = client(n.url, { requestTimeout: 60_000 });
  await next(h, 'open');
  n.stop(); // the node takes the publish but cannot answer
  await sleep(50); // the signal has landed
  const p = h.publish('t', 1);
  await sleep(50);
  h.close();
  // 'closed', not 'timeout': close() settled it (the request timeout is a minute).
  await assert.rejects(p, (e) => e instanceof HeraldError && e.code === 'closed');
  n.cont();
});

test('a long gap between timer ticks (a background tab) does not drop a healthy connection', async () => {
  const n = await node([]);
  // The page's clock jumps a minute right after a heartbeat was answered,
  // as when a hidden tab's timers run once a minute.
  const realNow = Date.now;
  let offset = 0;
  let armed = true;
  class SleepyTab extends WebSocket {
    set onmessage(fn) {
      super.onmessage = fn && ((ev) => {
        fn(ev);
        if (armed && String(ev.data) === 'HeartBeat') {
          armed = false;
          offset = 60_000;
          Date.now = () => realNow() + offset;
        }
      });
    }
    get onmessage() {
      return super.onmessage;
    }
  }
  try {
    const h = client(n.url, { WebSocket: SleepyTab, heartbeatInterval: 100, heartbeatTimeout: 500 });
    let dropped = 0;
    h.addEventListener('reconnecting', () => (dropped += 1));
    await next(h, 'open');
    await until('the clock jumped', () => !armed);
    await sleep(1_000); // many ticks after the jump
    assert.equal(dropped, 0, 'a healthy connection was dropped after the clock jump');
    assert.equal(h.state, 'open');
  } finally {
    Date.now = realNow;
  }
});

test('the backoff starts over only after a connection stayed up, and the attempt is told', async () => {
  const n = await node([]);
  const h = client(n.url, { stableAfter: 60_000, maxReconnectAttempts: 3 });
  await next(h, 'open');
  const attempts = [];
  h.addEventListener('reconnecting', (e) => attempts.push(e.detail.attempt));
  await n.kill();
  const closed = await next(h, 'closed');
  // Three attempts against a dead port, then it gives up, saying why.
  assert.deepEqual(attempts, [1, 2, 3]);
  assert.match(closed.detail.reason, /gave up after 3/);
  await assert.rejects(h.publish('t', 1), (e) => e.code === 'closed');
});

test('a publish made while disconnected is bounded in time', async () => {
  const n = await node([]);
  const h = client(n.url, { publishTimeout: 300 });
  await next(h, 'open');
  await n.kill();
  await until('reconnecting', () => h.state === 'reconnecting');
  await assert.rejects(h.publish('t', 1), (e) => e.code === 'timeout');
});

test('offline drops the socket at once; online reconnects at once', async () => {
  const n = await node([]);
  const win = new EventTarget();
  globalThis.window = win;
  try {
    // A backoff far longer than the test: only `online` can bring it back.
    const h = client(n.url, { minReconnectDelay: 60_000, maxReconnectDelay: 60_000 });
    await next(h, 'open');
    win.dispatchEvent(new Event('offline'));
    assert.equal(h.state, 'reconnecting');
    const queued = h.publish('t', 'while offline');
    await sleep(200);
    assert.equal(h.state, 'reconnecting', 'no attempt while offline');
    win.dispatchEvent(new Event('online'));
    await until('open again at once', () => h.state === 'open', 5_000);
    await queued;
  } finally {
    delete globalThis.window;
  }
});

test('a tab that becomes visible checks the connection at once', async () => {
  const n = await node([]);
  const doc = Object.assign(new EventTarget(), { visibilityState: 'hidden' });
  globalThis.document = doc;
  let heartbeats = 0;
  class Counting extends WebSocket {
    send(data) {
      if (data === 'HeartBeat') heartbeats += 1;
      return super.send(data);
    }
  }
  try {
    // Timers that would not send a heartbeat for a minute, as in a hidden tab.
    const h = client(n.url, { WebSocket: Counting, heartbeatInterval: 60_000, heartbeatTimeout: 500 });
    await next(h, 'open');
    await until('the first heartbeat', () => heartbeats === 1);
    await sleep(100); // its answer arrives
    doc.visibilityState = 'visible';
    doc.dispatchEvent(new Event('visibilitychange'));
    assert.equal(heartbeats, 2, 'becoming visible sent a heartbeat at once');
    // A node that stopped answering is noticed from that heartbeat.
    n.stop();
    doc.dispatchEvent(new Event('visibilitychange'));
    const lost = await next(h, 'reconnecting');
    assert.equal(lost.detail.code, 4002);
    n.cont();
  } finally {
    delete globalThis.document;
  }
});

test('tokens: getToken on every connect, refresh before exp, 4003 reconnects with a new token, 4501 is terminal', async () => {
  const n = await node(['--auth-hmac-key-file', HMAC_KEY, '--auth-leeway', '0s', '--api-key', 'k']);
  const token = (sub, ttl) => mintToken({ sub, subscribe: ['chat:*'], ttl });
  assert.ok(tokenExpiry(token('ann', '60s')) > Date.now() / 1000);

  // Refreshed in band: the socket outlives its first token, no reconnect.
  let calls = 0;
  const refreshed = client(n.url, { getToken: async () => token('ann', ++calls === 1 ? '2s' : '60s') });
  const reconnects = [];
  refreshed.addEventListener('reconnecting', (e) => reconnects.push(e.detail.code));
  const got = collector();
  refreshed.subscribe('chat:*', got.fn);
  await next(refreshed, 'refreshed');
  await sleep(2500); // past the first token's exp
  await n.publish('chat:a', 1);
  await until('delivery after the first exp', () => got.got.length === 1);
  assert.deepEqual(reconnects, []);
  assert.equal(calls, 2);

  // A refused refresh: the node closes with 4003 at exp, the client gets a
  // new token and reconnects.
  let calls2 = 0;
  const lapsing = client(n.url, {
    getToken: () => {
      calls2++;
      if (calls2 === 1) return token('bob', '2s');
      if (calls2 === 2) return token('mallory', '60s'); // another sub: refused
      return token('bob', '60s');
    },
  });
  const errors = [];
  lapsing.addEventListener('error', (e) => errors.push(e.error.code));
  const got2 = collector();
  lapsing.subscribe('chat:*', got2.fn);
  const lost = await next(lapsing, 'reconnecting');
  assert.equal(lost.detail.code, 4003);
  assert.ok(errors.includes('unauthorized'), errors.join());
  await next(lapsing, 'open');
  assert.equal(calls2, 3);
  await n.publish('chat:b', 2);
  await until('delivery after the reconnect', () => got2.got.length === 1);

  // A token the node refuses: closed with 4501, and no retry.
  let calls3 = 0;
  const refused = client(n.url, {
    getToken: () => {
      calls3++;
      return 'not.a.token';
    },
  });
  const closed = await next(refused, 'closed');
  assert.equal(closed.detail.code, 4501);
  assert.match(closed.detail.reason, /^unauthorized/);
  await sleep(300);
  assert.equal(calls3, 1);
  assert.equal(refused.state, 'closed');
});

test('subscription objects: ready(), subscribed after every (re)subscribe, errors that name the pattern', async () => {
  const n = await node([]);
  const h = client(n.url);
  const got = collector();
  const sub = h.subscribe('orders:*', got.fn);
  assert.equal(typeof sub, 'function', 'still callable to unsubscribe');
  assert.equal(sub.state, 'subscribing');
  let subscribed = 0;
  sub.addEventListener('subscribed', () => subscribed++);
  await sub.ready();
  assert.equal(sub.state, 'subscribed');
  assert.equal(subscribed, 1);
  await n.restart();
  await until('subscribed again after the reconnect', () => subscribed === 2);
  await n.publish('orders:7', 1);
  await until('delivery', () => got.got.length === 1);

  const globalErrors = [];
  h.addEventListener('error', (e) => globalErrors.push(e.error.code));
  const bad = h.subscribe('orders..x', () => {});
  const subErrors = [];
  bad.addEventListener('error', (e) => subErrors.push(e.error));
  await assert.rejects(bad.ready(), (e) => e instanceof HeraldError && e.code === 'bad_topic' && e.pattern === 'orders..x');
  assert.equal(bad.state, 'error');
  assert.equal(subErrors.length, 1);
  assert.ok(globalErrors.includes('bad_topic'));
  sub.unsubscribe();
  assert.equal(sub.state, 'unsubscribed');
});

test('a URL that can never work, and refused handshakes, fail clearly', async () => {
  const bad = new Herald('ftp://127.0.0.1/nowhere', { WebSocket });
  clients.push(bad);
  assert.equal(bad.state, 'closed');
  const n = await node([]);
  const refused = client(`${n.url}?sub=a..b`);
  const errors = [];
  refused.addEventListener('error', (e) => errors.push(e.error));
  const closed = await next(refused, 'closed');
  assert.match(closed.detail.reason, /HTTP 400/);
  assert.equal(errors[0].code, 'handshake_refused');
  // A node at its limit (503) is worth retrying, but the client says why and slows down.
  const full = await node(['--max-connections', '0']);
  const waiting = client(full.url, { minReconnectDelay: 10, maxReconnectDelay: 50 });
  const seen = [];
  waiting.addEventListener('error', (e) => seen.push(e.error));
  await until('told why after three refusals', () => seen.some((e) => e.code === 'handshake_refused'));
  assert.match(seen.find((e) => e.code === 'handshake_refused').message, /HTTP 503.*slowing down/);
  assert.notEqual(waiting.state, 'closed');
});

test('presence(topic) and presenceStats(topic) ask who is here', async () => {
  const n = await node(['--presence', 'chat:*']);
  const a = client(`${n.url}?name=ann`);
  const b = client(`${n.url}?name=bob`);
  const mine = a.subscribe('chat:lobby', () => {});
  const sub = b.subscribe('chat:lobby', () => {});
  await Promise.all([mine.ready(), sub.ready()]);
  await until('both in the room', async () => (await a.presenceStats('chat:lobby')).clients === 2);
  const list = await a.presence('chat:lobby');
  assert.deepEqual(list.members.map((m) => m.name).sort(), ['ann', 'bob']);
  assert.equal(list.users, 2);
  await assert.rejects(a.presence('news:x'), (e) => e.code === 'bad_request');
});

test('history: a reconnect recovers what was missed, once and in order; a lost history is a gap', async () => {
  const n = await node(['--history', 'feed:*=1000']);
  const win = new EventTarget();
  globalThis.window = win;
  try {
    const h = client(n.url, { minReconnectDelay: 60_000, maxReconnectDelay: 60_000 });
    const got = [];
    const sub = h.subscribe('feed:*', (data, topic) => got.push(`${topic}/${data.n}`));
    await sub.ready();
    for (let i = 0; i < 3; i++) await n.publish('feed:a', { n: i });
    await until('live', () => got.length === 3);
    assert.equal(sub.position.seq, 3);
    // The network goes; messages are published meanwhile; it comes back.
    win.dispatchEvent(new Event('offline'));
    for (let i = 3; i < 8; i++) await n.publish(i % 2 ? 'feed:b' : 'feed:a', { n: i });
    win.dispatchEvent(new Event('online'));
    await until('recovered', () => got.length === 8);
    assert.equal(sub.recovered, true);
    assert.deepEqual(got.slice(3), ['feed:b/3', 'feed:a/4', 'feed:b/5', 'feed:a/6', 'feed:b/7']);
    await n.publish('feed:a', { n: 8 });
    await until('live again', () => got.length === 9);
    await sleep(100);
    assert.equal(got.length, 9, 'nothing twice');

    // The node restarts: its in-memory history is gone.
    const gaps = [];
    h.addEventListener('gap', (e) => gaps.push(e.detail));
    win.dispatchEvent(new Event('offline'));
    await n.restart();
    win.dispatchEvent(new Event('online'));
    await until('gap told', () => gaps.length === 1);
    assert.deepEqual(gaps[0], { pattern: 'feed:*', reason: 'epoch_changed' });
    assert.equal(sub.recovered, false);

    // last: the current value first.
    await n.publish('feed:price', { n: 42 });
    const prices = [];
    const p = h.subscribe('feed:price', (data) => prices.push(data.n), { last: true });
    await p.ready();
    await until('current value', () => prices.length === 1);
    await sleep(100);
    assert.deepEqual(prices, [42], 'once, though it also came live');
  } finally {
    delete globalThis.window;
  }
});
