// A typed use of the client, checked by `tsc --noEmit` against herald.d.ts.
import Herald, { HeraldError, isTerminal, matches, tokenExpiry, type HeraldState, type PresenceNotice } from '../herald.js';

const h = new Herald('ws://127.0.0.1:8080/ws', { heartbeatInterval: 5000, maxQueue: 10 });
h.addEventListener('open', (e) => {
  const s: HeraldState = e.detail.state;
  console.log(s, e.detail.code, e.detail.reason);
});
h.addEventListener('reconnecting', (e) => {
  if (e.detail.code !== undefined && isTerminal(e.detail.code)) h.close();
});
h.addEventListener('error', (e) => console.error(e.error));
const off: () => void = h.subscribe('todo:*', (data: unknown, topic: string) => console.log(topic, data, matches('todo:*', topic)));
h.presence('chat:lobby', (n: PresenceNotice) => console.log(n.event, n.client, n.name));
h.publish('todo:count', 3).catch((e: unknown) => {
  if (e instanceof HeraldError) console.log(e.code);
});
const err = new HeraldError('closed', 'the client was closed');
console.log(err.code, h.state === 'connecting', h.url);
off();

// Access control: a token source called on every connect and before exp.
const authed = new Herald('ws://127.0.0.1:8080/ws', {
  getToken: async () => (await fetch('/token')).text(),
});
authed.addEventListener('refreshed', () => undefined);
const exp: number | undefined = tokenExpiry('a.b.c');
void exp;

// Subscription objects: still callable, with state, ready() and events.
const orders = h.subscribe('orders:*', () => undefined);
orders.addEventListener('subscribed', () => console.log('refetch what was missed'));
orders.addEventListener('error', (e) => console.log((e.error as HeraldError).pattern));
void orders.ready().then(() => console.log(orders.state, orders.pattern));
orders();

// Presence: ask who is here.
void h.presence('chat:lobby').then((p) => console.log(p.members.map((m) => m.user ?? m.client), p.clients, p.truncated));
void h.presenceStats('chat:lobby').then((s) => console.log(s.clients, s.users));
