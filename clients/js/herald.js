// Herald client: one WebSocket per page, many topics on it, a heartbeat that
// notices a dead server, and a reconnect that resubscribes and loses nothing
// it promised to send. No runtime dependencies; an ES module for browsers
// (<script type="module">) and Node (pass `WebSocket` from the `ws` package
// on Node 20).

const TERMINAL = new Set([1002, 1003, 1007, 1008, 1009, 1010]);

/** Whether a close code means "do not reconnect" (see docs/protocol.md). */
export function isTerminal(code) {
  return TERMINAL.has(code) || (code >= 4500 && code <= 4999);
}

/** Whether concrete `topic` falls under `pattern` (`*` one segment, `>` the rest). */
export function matches(pattern, topic) {
  const p = pattern.split(':');
  const t = topic.split(':');
  for (let i = 0; i < p.length; i++) {
    if (p[i] === '>') return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== '*' && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/** The `exp` claim (Unix seconds) of a JWT, or undefined. Not a check:
 * the node verifies tokens; the client only schedules refreshes. */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(part + '==='.slice((part.length + 3) % 4))).exp;
    return typeof exp === 'number' ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** An ack without its envelope. */
function strip(ack) {
  const { op: _op, id: _id, ...rest } = ack || {};
  return rest;
}

/** An error the node answered with, or one the client raised. */
export class HeraldError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'HeraldError';
    this.code = code;
  }
}

const DEFAULTS = {
  WebSocket: globalThis.WebSocket,
  heartbeatWord: 'HeartBeat',
  heartbeatInterval: 10_000,
  heartbeatTimeout: 25_000,
  minReconnectDelay: 500,
  maxReconnectDelay: 15_000,
  maxQueue: 1000,
  requestTimeout: 10_000,
  publishTimeout: 30_000,
  stableAfter: 5_000,
  maxReconnectAttempts: Infinity,
  token: undefined,
  getToken: undefined,
};

/**
 * A connection to a Herald node.
 *
 * Events (EventTarget): `state` (detail: {state, code, reason}), and one
 * event per state: `connecting`, `open`, `reconnecting`, `closed`; `error`;
 * `refreshed` after a token refresh.
 *
 * Access control: `token` (a JWT), or `getToken()` (async, called on every
 * connect and before the token expires). The token goes in the socket's
 * first frame, never in the URL. Close 4501 (refused) is terminal; 4003
 * (expired) reconnects with a new token.
 */
export class Herald extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    if (!this.options.WebSocket) {
      throw new HeraldError('no_websocket', 'no WebSocket implementation: pass options.WebSocket');
    }
    this.state = 'connecting';
    this._subs = new Map(); // pattern -> { data: Set<fn>, presence: Set<fn> }
    this._pending = new Map(); // id -> { resolve, reject, timer }
    this._queue = []; // publishes waiting for a connection
    this._nextId = 1;
    this._attempt = 0;
    this._ws = null;
    this._timers = {};
    this._closedByUser = false;
    this._gen = 0; // connection attempts, so a late getToken() is ignored
    this._connect();
  }

  /**
   * Calls `handler(data, topic)` for every message on topics matching
   * `pattern`. Returns a Subscription: call it (or its `unsubscribe()`) to
   * remove this handler (and the subscription, when it was the last one);
   * `ready()` resolves once the node has it in effect; `state` is
   * `subscribing`, `subscribed`, `error` or `unsubscribed`; it dispatches
   * `subscribed` after every (re)subscribe (the moment to refetch what was
   * missed) and `error` (with `error.pattern`) when the node refuses it.
   *
   * On topics the node keeps history for (`--history`), every message
   * carries its position; the subscription keeps the last one
   * (`position`) and every reconnect asks for what was missed since. The
   * node replays it before live messages, each once and in order;
   * `recovered` is then true. When it cannot (`recovered` false: the
   * history was lost, or is too short, or the gap too long), the
   * subscription and the client dispatch `gap` with `detail.reason`:
   * reload the state. `{last: true}` first delivers each matching topic's
   * latest retained message (a counter, a price: the current value).
   */
  subscribe(pattern, handler, options = {}) {
    return this._add(pattern, 'data', handler, options);
  }

  /**
   * With a handler: calls `handler({event, client, user, name}, topic)` for
   * join and leave notices on topics matching `pattern` (the node must
   * announce them: --presence), and returns a Subscription.
   *
   * Without one: asks who is on topic `pattern` now, cluster-wide; resolves
   * with `{members: [{client, user, name}], clients, users, truncated}`.
   */
  presence(pattern, handler) {
    if (handler === undefined) return this._request({ op: 'presence', topic: pattern }).then(strip);
    return this._add(pattern, 'presence', handler);
  }

  /** How many sockets and users are on topic `topic`: `{clients, users}`. */
  presenceStats(topic) {
    return this._request({ op: 'presence_stats', topic }).then(strip);
  }

  /**
   * Publishes `data` (any JSON value) to `topic`. Resolves when the node
   * acknowledges it; rejects with a HeraldError when the node refuses it,
   * when the queue for publishes made while disconnected is full, or when
   * the connection is lost after sending and before the ack.
   */
  publish(topic, data) {
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') {
        reject(new HeraldError('closed', 'the client is closed'));
        return;
      }
      const item = { topic, data, resolve, reject };
      if (this.state === 'open') {
        this._sendPublish(item);
      } else if (this._queue.length >= this.options.maxQueue) {
        reject(new HeraldError('queue_full', `at most ${this.options.maxQueue} publishes wait for a connection`));
      } else {
        // Bounded in time as well as in count: a publish that waited
        // `publishTimeout` for a connection is rejected, not sent late.
        item.timer = setTimeout(() => {
          const i = this._queue.indexOf(item);
          if (i >= 0) {
            this._queue.splice(i, 1);
            reject(new HeraldError('timeout', `not connected within ${this.options.publishTimeout} ms`));
          }
        }, this.options.publishTimeout);
        this._queue.push(item);
      }
    });
  }

  /**
   * Closes for good: no reconnect. Queued publishes and those waiting for
   * their ack are rejected with code `closed`. Safe to call from any
   * event listener, `reconnecting` included.
   */
  close() {
    if (this._closedByUser) return;
    this._closedByUser = true;
    this._teardown();
    this._stopVisibilityWatch();
    const closed = new HeraldError('closed', 'the client was closed');
    this._failPending(closed);
    this._failQueued(closed);
    this._setState('closed', 1000, 'closed by the client');
  }

  // --- internals ---

  _add(pattern, kind, handler, options = {}) {
    let entry = this._subs.get(pattern);
    if (!entry) {
      entry = {
        data: new Set(),
        presence: new Set(),
        state: 'subscribing',
        error: null,
        events: new EventTarget(),
        position: null,
        recovered: undefined,
        last: options.last === true,
      };
      this._subs.set(pattern, entry);
      if (this.state === 'open') this._subscribe(pattern, entry);
    }
    entry[kind].add(handler);
    let removed = false;
    const unsubscribe = () => {
      if (removed) return;
      removed = true;
      const e = this._subs.get(pattern);
      if (!e || !e[kind].delete(handler)) return;
      if (e.data.size === 0 && e.presence.size === 0) {
        this._subs.delete(pattern);
        e.state = 'unsubscribed';
        if (this.state === 'open') this._request({ op: 'unsub', topic: pattern }).catch((err) => this._report(err));
      }
    };
    // A function, so `const off = herald.subscribe(..); off()` keeps working.
    const sub = () => unsubscribe();
    sub.unsubscribe = unsubscribe;
    sub.pattern = pattern;
    Object.defineProperty(sub, 'state', { get: () => (removed ? 'unsubscribed' : entry.state) });
    Object.defineProperty(sub, 'position', { get: () => (entry.position ? { ...entry.position } : null) });
    Object.defineProperty(sub, 'recovered', { get: () => entry.recovered });
    sub.addEventListener = (...a) => entry.events.addEventListener(...a);
    sub.removeEventListener = (...a) => entry.events.removeEventListener(...a);
    sub.ready = () =>
      new Promise((resolve, reject) => {
        if (entry.state === 'subscribed') return resolve();
        if (entry.state === 'error') return reject(entry.error);
        if (removed) return reject(new HeraldError('unsubscribed', `${pattern} was unsubscribed`));
        const done = () => {
          entry.events.removeEventListener('subscribed', ok);
          entry.events.removeEventListener('error', fail);
        };
        const ok = () => (done(), resolve());
        const fail = (e) => (done(), reject(e.error));
        entry.events.addEventListener('subscribed', ok);
        entry.events.addEventListener('error', fail);
      });
    return sub;
  }

  /** Asks the node for `pattern`; the answer goes to its subscriptions. */
  _subscribe(pattern, entry) {
    entry.state = 'subscribing';
    entry.error = null;
    const req = { op: 'sub', topic: pattern };
    if (entry.position) req.since = entry.position;
    else if (entry.last) req.last = true;
    this._request(req).then(
      (ack) => {
        if (this._subs.get(pattern) !== entry) return;
        entry.state = 'subscribed';
        if (typeof ack.recovered === 'boolean') {
          entry.recovered = ack.recovered;
          if (!ack.recovered) {
            // Live from here: the history's current position.
            entry.position = ack.seq > 0 ? { seq: ack.seq, epoch: ack.epoch } : null;
            const detail = { pattern, reason: ack.reason };
            entry.events.dispatchEvent(Object.assign(new Event('gap'), { detail }));
            this.dispatchEvent(Object.assign(new Event('gap'), { detail }));
          }
        }
        entry.events.dispatchEvent(new Event('subscribed'));
      },
      (error) => {
        // A lost connection is not the subscription's fault: it is sent
        // again on the next open.
        if (error.code === 'connection_lost' || error.code === 'not_connected') return;
        error.pattern = pattern;
        entry.state = 'error';
        entry.error = error;
        entry.events.dispatchEvent(Object.assign(new Event('error'), { error }));
        this._report(error);
      },
    );
  }

  _report(error) {
    this.dispatchEvent(Object.assign(new Event('error'), { error }));
  }

  _setState(state, code, reason, attempt) {
    this.state = state;
    const detail = { state, code, reason };
    if (attempt !== undefined) detail.attempt = attempt;
    this.dispatchEvent(Object.assign(new Event('state'), { detail }));
    this.dispatchEvent(Object.assign(new Event(state), { detail }));
  }

  /**
   * Opens a connection, after asking `getToken()` for a fresh token when
   * it is given (on every connect: a reconnect after 4003 token_expired
   * gets a new one).
   */
  _connect() {
    if (this._closedByUser) return;
    this._watchVisibility();
    this._watchNetwork();
    if (this.state !== 'reconnecting') this._setState('connecting');
    const { getToken } = this.options;
    if (!getToken) {
      this._token = this.options.token;
      this._open();
      return;
    }
    const gen = ++this._gen;
    Promise.resolve()
      .then(() => getToken())
      .then(
        (token) => {
          if (gen !== this._gen || this._closedByUser) return;
          this._token = token;
          this._open();
        },
        (e) => {
          if (gen !== this._gen || this._closedByUser) return;
          this._report(new HeraldError('token', `getToken() failed: ${(e && e.message) || e}`));
          this._scheduleReconnect(1006, 'getToken() failed');
        },
      );
  }

  /**
   * Refreshes the token in band before it expires (at 80% of its remaining
   * life), with the same `getToken()`. A refused refresh is reported; the
   * node then closes with 4003 at `exp`, and the reconnect gets a new token.
   */
  _scheduleRefresh() {
    clearTimeout(this._timers.refresh);
    const exp = this.options.getToken && this._token && tokenExpiry(this._token);
    if (!exp) return;
    const delay = Math.max(0, (exp * 1000 - Date.now()) * 0.8);
    this._timers.refresh = setTimeout(async () => {
      try {
        const token = await this.options.getToken();
        if (this.state !== 'open') return;
        await this._request({ op: 'refresh', token });
        this._token = token;
        this._scheduleRefresh();
        this.dispatchEvent(new Event('refreshed'));
      } catch (e) {
        this._report(e instanceof HeraldError ? e : new HeraldError('token', `refresh failed: ${(e && e.message) || e}`));
      }
    }, delay);
  }

  _open() {
    let ws;
    try {
      ws = new this.options.WebSocket(this.url);
    } catch (e) {
      // A URL that can never work (not ws:// or wss://, malformed): fail
      // once, clearly, instead of retrying forever.
      this._giveUp(new HeraldError('bad_url', `cannot open ${this.url}: ${(e && e.message) || e}`));
      return;
    }
    this._ws = ws;
    let opened = false;
    let failure = '';
    ws.onopen = () => {
      opened = true;
      this._refusals = 0;
      // The backoff starts over only once the connection has stayed up: a
      // node that accepts and then closes is not hammered.
      clearTimeout(this._timers.stable);
      this._timers.stable = setTimeout(() => {
        this._attempt = 0;
      }, this.options.stableAfter);
      this._lastSeen = Date.now();
      this._startHeartbeat();
      // Authenticate, resubscribe and send what was queued before anyone
      // hears `open`, so a publish made in an `open` listener follows them.
      // The node handles frames in order: no need to wait for the auth ack
      // (a refused token closes the socket with 4501, which is terminal).
      this.state = 'open';
      if (this._token) {
        this._request({ op: 'auth', token: this._token }).catch((e) => this._report(e));
        this._scheduleRefresh();
      }
      for (const [pattern, entry] of this._subs) this._subscribe(pattern, entry);
      const queued = this._queue;
      this._queue = [];
      for (const item of queued) {
        clearTimeout(item.timer);
        this._sendPublish(item);
      }
      this._setState('open');
    };
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      if (!opened && this._refused(failure)) return;
      this._lost(ev.code, ev.reason);
    };
    // Browsers hide why a handshake failed; Node's `ws` says (its message
    // carries the HTTP status).
    ws.onerror = (ev) => {
      failure = (ev && (ev.message || (ev.error && ev.error.message))) || '';
    };
  }

  /**
   * A handshake that never opened. An HTTP refusal that will not change
   * (400 bad sub=, 401, 403, 404) ends the client with a clear error, where
   * the environment shows the status. Otherwise, after three in a row, the
   * client says why it may be failing and backs off to its longest delay.
   * Returns true when it gave up.
   */
  _refused(failure) {
    this._refusals = (this._refusals || 0) + 1;
    const status = Number((/Unexpected server response: (\d+)/.exec(failure) || [])[1]);
    if ([400, 401, 403, 404, 426].includes(status)) {
      this._giveUp(new HeraldError('handshake_refused', `the node refused the handshake with HTTP ${status}: check the URL's sub= patterns, the token, and --allowed-origins`));
      return true;
    }
    if (this._refusals === 3) {
      this._report(new HeraldError('handshake_refused',
        `${this._refusals} handshakes in a row closed before opening${status ? ` (HTTP ${status})` : ''}: ` +
        'a bad sub= pattern, an origin the node does not allow (--allowed-origins), a refused token, ' +
        'or a node at its limits; slowing down'));
    }
    if (this._refusals >= 3) this._attempt = Math.max(this._attempt, 30); // the longest backoff
    return false;
  }

  /** Ends the client for a reason that retrying cannot fix. */
  _giveUp(error) {
    this._teardown();
    this._closedByUser = true;
    this._stopVisibilityWatch();
    this._failPending(error);
    this._failQueued(error);
    this._report(error);
    this._setState('closed', 1006, error.message);
  }

  _lost(code, reason) {
    this._teardown();
    for (const entry of this._subs.values()) if (entry.state === 'subscribed') entry.state = 'subscribing';
    this._failPending(new HeraldError('connection_lost', `connection lost (${code}) before the answer`));
    if (this._closedByUser) return;
    if (isTerminal(code)) {
      this._failQueued(new HeraldError('closed', `node closed the connection: ${code} ${reason}`));
      this._setState('closed', code, reason);
      return;
    }
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    const { minReconnectDelay: min, maxReconnectDelay: max, maxReconnectAttempts } = this.options;
    if (this._attempt >= maxReconnectAttempts) {
      const why = `gave up after ${this._attempt} reconnect attempts (last close ${code} ${reason || ''})`.trim();
      this._closedByUser = true;
      this._stopVisibilityWatch();
      this._failQueued(new HeraldError('closed', why));
      this._setState('closed', code, why);
      return;
    }
    const cap = Math.min(max, min * 2 ** this._attempt);
    const delay = min / 2 + Math.random() * Math.max(0, cap - min / 2); // full jitter above a floor
    this._attempt++;
    // Offline (the browser says so): wait for `online` instead of a timer.
    // The timer first otherwise: a `reconnecting` listener that calls
    // close() must find it to cancel.
    if (!this._offline) this._timers.reconnect = setTimeout(() => this._connect(), delay);
    this._setState('reconnecting', code, reason, this._attempt);
  }

  _teardown() {
    clearInterval(this._timers.heartbeat);
    clearTimeout(this._timers.reconnect);
    clearTimeout(this._timers.stable);
    clearTimeout(this._timers.refresh);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close();
      } catch {
        // already closed
      }
    }
  }

  /**
   * Sends the heartbeat word every `heartbeatInterval` and gives up on the
   * node only when one that was sent got no answer (nor anything else)
   * within `heartbeatTimeout`. Wall-clock silence alone proves nothing: a
   * background tab's timers run once a minute, and a quiet topic is quiet.
   */
  _startHeartbeat() {
    const { heartbeatInterval } = this.options;
    this._heartbeatSent = 0;
    this._timers.heartbeat = setInterval(() => this._checkHeartbeat(), Math.min(heartbeatInterval, 1000));
  }

  _checkHeartbeat() {
    const { heartbeatInterval, heartbeatTimeout, heartbeatWord } = this.options;
    const now = Date.now();
    const sent = this._heartbeatSent;
    if (sent && this._lastSeen < sent && now - sent > heartbeatTimeout) {
      // The heartbeat went out and nothing at all came back: the node is gone.
      this._lost(4002, 'heartbeat_timeout: no answer from the node');
      return;
    }
    const answered = !sent || this._lastSeen >= sent;
    if (answered && now - sent >= heartbeatInterval && this._ws && this._ws.readyState === 1) {
      this._heartbeatSent = now;
      this._ws.send(heartbeatWord);
    }
  }

  /**
   * The browser's network events: `offline` drops the socket at once (it
   * cannot work, and the heartbeat would take a while to notice); `online`
   * reconnects at once, without waiting for the backoff.
   */
  _watchNetwork() {
    const w = globalThis.window;
    if (this._onOffline || !w || typeof w.addEventListener !== 'function') return;
    this._onOffline = () => {
      this._offline = true;
      if (this.state === 'open' || this.state === 'connecting') this._lost(1006, 'offline');
      else clearTimeout(this._timers.reconnect);
    };
    this._onOnline = () => {
      this._offline = false;
      if (this.state === 'reconnecting') {
        clearTimeout(this._timers.reconnect);
        this._connect();
      }
    };
    w.addEventListener('offline', this._onOffline);
    w.addEventListener('online', this._onOnline);
    this._win = w;
  }

  /** Checks at once when a hidden tab becomes visible again. */
  _watchVisibility() {
    if (this._onVisible || typeof document === 'undefined' || !document.addEventListener) return;
    this._onVisible = () => {
      if (document.visibilityState !== 'visible' || this.state !== 'open') return;
      if (this._heartbeatSent && this._lastSeen < this._heartbeatSent) {
        this._checkHeartbeat();
      } else if (this._ws && this._ws.readyState === 1) {
        this._heartbeatSent = Date.now();
        this._ws.send(this.options.heartbeatWord);
      }
    };
    document.addEventListener('visibilitychange', this._onVisible);
    this._doc = document;
  }

  _stopVisibilityWatch() {
    if (this._onVisible) this._doc.removeEventListener('visibilitychange', this._onVisible);
    this._onVisible = null;
    if (this._onOffline) {
      this._win.removeEventListener('offline', this._onOffline);
      this._win.removeEventListener('online', this._onOnline);
    }
    this._onOffline = this._onOnline = null;
  }

  _onMessage(raw) {
    this._lastSeen = Date.now();
    const text = typeof raw === 'string' ? raw : String(raw);
    if (text === this.options.heartbeatWord) return;
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.op === 'ack' || msg.op === 'error') {
      const p = this._pending.get(msg.id);
      if (p) {
        this._pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.op === 'ack') p.resolve(msg);
        else p.reject(new HeraldError(msg.code, msg.message));
      } else if (msg.op === 'error') {
        this._report(new HeraldError(msg.code, msg.message));
      }
      return;
    }
    if (typeof msg.topic !== 'string') return;
    const kind = msg.event ? 'presence' : 'data';
    const seq = typeof msg.seq === 'number' && typeof msg.epoch === 'string' ? msg.seq : null;
    for (const [pattern, entry] of this._subs) {
      if (!matches(pattern, msg.topic)) continue;
      if (seq !== null) {
        // Had already (a `last` replay of what another subscription
        // delivered live): history arrives in seq order, so never twice.
        const p = entry.position;
        if (p && p.epoch === msg.epoch && seq <= p.seq) continue;
        entry.position = { seq, epoch: msg.epoch };
      }
      for (const fn of entry[kind]) {
        try {
          if (kind === 'data') fn(msg.data, msg.topic);
          else fn({ event: msg.event, client: msg.client, user: msg.user, name: msg.name }, msg.topic);
        } catch (e) {
          this._report(e);
        }
      }
    }
  }

  _request(body) {
    return new Promise((resolve, reject) => {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1) {
        reject(new HeraldError('not_connected', 'not connected'));
        return;
      }
      const id = this._nextId++;
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new HeraldError('timeout', `no answer within ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      this._pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ ...body, id }));
    });
  }

  _sendPublish(item) {
    this._request({ op: 'pub', topic: item.topic, data: item.data }).then(() => item.resolve(), item.reject);
  }

  _failPending(error) {
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this._pending.clear();
  }

  _failQueued(error) {
    const queued = this._queue;
    this._queue = [];
    for (const item of queued) {
      clearTimeout(item.timer);
      item.reject(error);
    }
  }
}

export default Herald;
