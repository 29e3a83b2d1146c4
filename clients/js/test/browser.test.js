// The demo page in real headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core) against a real herald process.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';

import { Node, mintToken, HMAC_KEY, sleep } from './harness.js';

// Keep every lookup and connection on this machine.
const CHROMIUM_FLAGS = [
  '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-extensions',
  '--disable-default-apps',
  '--no-pings',
  '--disable-domain-reliability',
  '--no-first-run',
  '--no-sandbox',
  '--headless',
];
const SCREENSHOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../docs/demo.png');

let browser;
let node;
before(async () => {
  node = await Node.start(['--presence', 'chat:*']);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: CHROMIUM_FLAGS,
    headless: true,
  });
});
after(async () => {
  await browser?.close();
  node?.cont();
  await node?.kill();
});

async function openDemo() {
  const page = await browser.newPage({ viewport: { width: 960, height: 640 } });
  await page.goto(`${node.http}/?hb=250&hbTimeout=1500`);
  await page.waitForFunction(() => document.getElementById('state').textContent === 'open');
  return page;
}

const messages = (page) => page.$$eval('#messages li', (lis) => lis.map((li) => li.textContent));

test('the demo page subscribes and shows what is published over HTTP', async () => {
  const page = await openDemo();
  await node.publish('demo:count', 42);
  await page.waitForFunction(() => document.getElementById('count').textContent === '42');
  const other = await openDemo(); // a second visitor: a join notice
  await page.waitForFunction(() => [...document.querySelectorAll('#messages li.notice')].some((li) => li.textContent.includes('joined')));
  // The member list, live: both visitors are here.
  await page.waitForFunction(() => document.getElementById('members').textContent.startsWith('here (2)'));
  await node.publish('chat:lobby', { from: 'ops', text: 'deploy finished' });
  await page.fill('#name', 'ann');
  await page.fill('#text', 'hello from the browser');
  await page.click('#chat button');
  await page.waitForFunction(() => document.getElementById('messages').textContent.includes('ann: hello from the browser'));
  assert.ok((await messages(other)).some((m) => m === 'ops: deploy finished'));
  await node.publish('demo:count', 43);
  await page.waitForFunction(() => document.getElementById('count').textContent === '43');
  await page.screenshot({ path: SCREENSHOT });
  await other.close();
  await page.close();
});

test('after the node restarts, the page receives again without a reload, including what it sent while down', async () => {
  const page = await openDemo();
  await page.evaluate(() => { window.notReloaded = true; });
  await node.kill();
  await page.waitForFunction(() => document.getElementById('state').textContent === 'reconnecting');
  await page.fill('#name', 'bob');
  await page.fill('#text', 'sent while the node was down');
  await page.click('#chat button');
  await node.restart();
  await page.waitForFunction(() => document.getElementById('state').textContent === 'open', null, { timeout: 15000 });
  await page.waitForFunction(() => document.getElementById('messages').textContent.includes('bob: sent while the node was down'));
  await node.publish('demo:count', 7);
  await page.waitForFunction(() => document.getElementById('count').textContent === '7');
  assert.equal(await page.evaluate(() => window.notReloaded), true);
  await page.close();
});

test('a node that stops answering is detected by the heartbeat, and the page recovers', async () => {
  const page = await openDemo();
  node.stop(); // SIGSTOP: the socket stays open but nothing answers
  await page.waitForFunction(() => document.getElementById('state').textContent === 'reconnecting', null, { timeout: 15000 });
  node.cont();
  await page.waitForFunction(() => document.getElementById('state').textContent === 'open', null, { timeout: 15000 });
  await node.publish('demo:count', 99);
  await page.waitForFunction(() => document.getElementById('count').textContent === '99');
  await page.close();
});

test('the classic chat page works unchanged on the bare address, with status 1 and the last message again with status 0', async () => {
  // The page is loaded from no site (setContent): its Origin is "null".
  const chat = await Node.start(['--root-topic', 'chat:lobby', '--raw-status', 'chat:*', '--allowed-origins', 'null']);
  try {
    const file = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../examples/chat.html');
    const html = (await import('node:fs')).readFileSync(file, 'utf8');
    // The page's one line of configuration: where its server is.
    const here = html.replace("'ws://localhost:8080'", `'ws://127.0.0.1:${chat.port}'`);
    assert.notEqual(here, html, 'examples/chat.html names its server as ws://localhost:8080');
    const open = async (name) => {
      const page = await browser.newPage();
      const frames = [];
      page.on('websocket', (ws) => ws.on('framereceived', (f) => frames.push(f.payload)));
      await page.setContent(here);
      await page.waitForFunction(() => document.body.dataset.state === 'open');
      await page.fill('#user', name);
      return { page, frames };
    };
    const items = (page) => page.$$eval('#messages li', (lis) => lis.map((li) => li.textContent));
    const ann = await open('ann');
    const bob = await open('bob');
    await ann.page.fill('#text', 'hello from ann');
    await ann.page.click('button');
    await bob.page.waitForFunction(() =>
      [...document.querySelectorAll('#messages li')].some((li) => li.textContent === 'ann: hello from ann'),
    );
    const said = bob.frames.map((f) => JSON.parse(f)).find((m) => m.text === 'hello from ann');
    assert.equal(said.status, 1);
    await bob.page.fill('#text', 'hi ann');
    await bob.page.click('button');
    await ann.page.waitForFunction(() =>
      [...document.querySelectorAll('#messages li')].some((li) => li.textContent === 'bob: hi ann'),
    );
    await ann.page.close();
    await bob.page.waitForFunction(() => [...document.querySelectorAll('#messages li')].some((li) => li.textContent === 'ann left'));
    await sleep(500); // anything more would arrive now
    const zeros = bob.frames.map((f) => JSON.parse(f)).filter((m) => m.status === 0);
    assert.equal(zeros.length, 1, JSON.stringify(zeros));
    assert.equal(zeros[0].user, 'ann');
    assert.equal(zeros[0].text, 'hello from ann');
    assert.equal((await items(bob.page)).filter((t) => t === 'ann left').length, 1);
    await bob.page.close();
  } finally {
    await chat.kill();
  }
});

const EXAMPLES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../examples');

/** An example page with its one line of configuration, the server's address, pointed at `port`. */
async function examplePage(name, port) {
  const html = (await import('node:fs')).readFileSync(path.join(EXAMPLES, name), 'utf8');
  const here = html.replace(/ws:\/\/localhost:8080/g, `ws://127.0.0.1:${port}`);
  assert.notEqual(here, html, `examples/${name} names its server as ws://localhost:8080`);
  const page = await browser.newPage();
  await page.setContent(here);
  return page;
}

test('websocketd mode: the classic count page, twice at once, each counts 1 to 10', async () => {
  const n = await Node.start(['--exec', `/count=${path.join(EXAMPLES, 'count.sh')}`, '--allowed-origins', 'null']);
  try {
    const pages = await Promise.all([examplePage('count.html', n.port), examplePage('count.html', n.port)]);
    const want = ['CONNECT', ...Array.from({ length: 10 }, (_, i) => `MESSAGE: ${i + 1}`), 'DISCONNECT'];
    for (const page of pages) {
      await page.waitForFunction(() => document.getElementById('log').textContent.includes('DISCONNECT'), null, {
        timeout: 20000,
      });
      const log = (await page.$eval('#log', (e) => e.textContent)).trim().split('\n');
      assert.deepEqual(log, want);
      await page.close();
    }
  } finally {
    await n.kill();
  }
});

test('the classic heartbeat page gets its answers and its data', async () => {
  const n = await Node.start(['--allowed-origins', 'null']);
  try {
    const page = await examplePage('heartbeat.html', n.port);
    await page.waitForFunction(() => document.body.dataset.state === 'open');
    await page.waitForFunction(() => Number(document.getElementById('beats').textContent) >= 2, null, { timeout: 10000 });
    await n.publish('todo:count', 5);
    await page.waitForFunction(() => document.getElementById('count').textContent === '5');
    assert.equal(await page.evaluate(() => document.body.dataset.state), 'open');
    await page.close();
  } finally {
    await n.kill();
  }
});

test('the status page: its numbers move while a load runs', async () => {
  const n = await Node.start([]);
  const sockets = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
    await page.goto(`${n.http}/status`);
    await page.waitForFunction(() => document.body.dataset.updated);
    const cell = (col) => page.$eval(`#nodes tbody tr td:nth-child(${col})`, (td) => td.textContent);
    assert.equal(await cell(2), '0', 'no connections yet');
    for (let i = 0; i < 40; i++) {
      const ws = new WebSocket(`${n.url}?sub=load:room`);
      sockets.push(ws);
    }
    let stop = false;
    const publishing = (async () => {
      while (!stop) {
        await n.publish('load:room', { at: Date.now() });
        await sleep(5);
      }
    })();
    await page.waitForFunction(() => document.querySelector('#nodes tbody tr td:nth-child(2)').textContent === '40');
    await page.waitForFunction(() => Number(document.querySelector('#nodes tbody tr td:nth-child(6)').textContent.replace('k', '')) > 0,
      null, { timeout: 10000 });
    await sleep(3000); // a few points on the charts
    stop = true;
    await publishing;
    await page.screenshot({ path: path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../docs/status.png') });
    await page.close();
  } finally {
    for (const ws of sockets) ws.terminate();
    await n.kill();
  }
});

test('in Chromium, a hidden tab whose timers fire once a minute keeps a healthy connection, and still notices a dead node', async () => {
  const n = await Node.start([]);
  try {
    const page = await browser.newPage();
    // Fake timers and clock, moved from here: fastForward fires each due
    // timer at most once, as a throttled background tab does.
    await page.clock.install();
    await page.goto(`${n.http}/herald.js`);
    await page.evaluate(async () => {
      const { Herald } = await import('/herald.js');
      window.log = [];
      window.got = [];
      const h = new Herald(`ws://${location.host}/ws`, { heartbeatInterval: 10000, heartbeatTimeout: 25000 });
      h.addEventListener('state', (e) => window.log.push(`${e.detail.state}:${e.detail.code || ''}`));
      h.subscribe('tab', (d) => window.got.push(d));
      window.h = h;
    });
    await page.waitForFunction(() => window.h.state === 'open');
    const setVisibility = (v) =>
      page.evaluate((v) => {
        Object.defineProperty(document, 'visibilityState', { value: v, configurable: true });
        document.dispatchEvent(new Event('visibilitychange'));
      }, v);
    await setVisibility('hidden');
    for (let i = 0; i < 3; i++) {
      await page.clock.fastForward(60_000); // a minute in a background tab
      await sleep(300); // the heartbeat's real round trip
    }
    await setVisibility('visible');
    await sleep(300);
    await n.publish('tab', 'still here');
    await page.waitForFunction(() => window.got.includes('still here'));
    let log = await page.evaluate(() => window.log);
    assert.ok(!log.some((l) => l.startsWith('reconnecting')), log.join());

    // A node that stops answering is still found out: the heartbeat sent
    // goes unanswered past heartbeatTimeout.
    n.stop();
    await page.clock.fastForward(60_000);
    await sleep(300);
    await page.clock.fastForward(30_000);
    await page.waitForFunction(() => window.log.some((l) => l.startsWith('reconnecting:4002')));
    n.cont();
    await page.close();
  } finally {
    n.cont();
    await n.kill();
  }
});

test('in Chromium, a page that loses its network recovers what was published meanwhile, once and in order', async () => {
  const n = await Node.start(['--history', 'feed:*=1000']);
  try {
    const page = await browser.newPage();
    await page.goto(`${n.http}/herald.js`);
    await page.evaluate(async () => {
      const { Herald } = await import('/herald.js');
      window.got = [];
      // A backoff longer than the test: only `online` brings it back.
      const h = new Herald(`ws://${location.host}/ws`, { minReconnectDelay: 60_000, maxReconnectDelay: 60_000 });
      window.sub = h.subscribe('feed:*', (d, t) => window.got.push(`${t}/${d}`));
      window.h = h;
      await window.sub.ready();
    });
    for (let i = 0; i < 2; i++) await n.publish('feed:a', i);
    await page.waitForFunction(() => window.got.length === 2);
    await page.evaluate(() => window.dispatchEvent(new Event('offline')));
    await page.waitForFunction(() => window.h.state === 'reconnecting');
    for (let i = 2; i < 5; i++) await n.publish(i % 2 ? 'feed:b' : 'feed:a', i);
    await page.evaluate(() => window.dispatchEvent(new Event('online')));
    await page.waitForFunction(() => window.got.length === 5);
    await n.publish('feed:a', 5);
    await page.waitForFunction(() => window.got.length === 6);
    await sleep(100);
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got, ['feed:a/0', 'feed:a/1', 'feed:a/2', 'feed:b/3', 'feed:a/4', 'feed:a/5']);
    assert.equal(await page.evaluate(() => window.sub.recovered), true);
    await page.close();
  } finally {
    await n.kill();
  }
});
