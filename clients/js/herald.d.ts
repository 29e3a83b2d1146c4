/** Connection states, in the order a connection goes through them. */
export type HeraldState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface HeraldOptions {
  /** WebSocket implementation; defaults to the global one (pass `ws` on Node 20). */
  WebSocket?: unknown;
  /** Text frame the node answers with itself (must match its --heartbeat-word). Default 'HeartBeat'. */
  heartbeatWord?: string;
  /** How often to send the heartbeat word, ms. Default 10000. */
  heartbeatInterval?: number;
  /** A heartbeat that got no answer (nor anything else) for this long, ms, means the node is gone: close and reconnect. Default 25000. */
  heartbeatTimeout?: number;
  /** Reconnect backoff bounds, ms (full jitter, doubling per attempt). Defaults 500 and 15000. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Publishes kept while disconnected; past it publish() rejects with code 'queue_full'. Default 1000. */
  maxQueue?: number;
  /** How long a publish or subscription waits for the node's answer, ms. Default 10000. */
  requestTimeout?: number;
  /** How long a publish made while disconnected waits for a connection before it rejects with 'timeout', ms. Default 30000. */
  publishTimeout?: number;
  /** A connection must stay up this long (ms) before the reconnect backoff starts over. Default 5000. */
  stableAfter?: number;
  /** Reconnect attempts in a row before the client gives up and goes to 'closed'. Default Infinity. */
  maxReconnectAttempts?: number;
  /** A connection token (JWT) sent in the socket's first frame. Cannot be refreshed: prefer getToken. */
  token?: string;
  /** Returns a fresh token; called on every connect, and before the token's exp to refresh in band. */
  getToken?: () => string | Promise<string>;
}

export interface StateDetail {
  state: HeraldState;
  /** Close code that caused the change, if any. */
  code?: number;
  reason?: string;
  /** On `reconnecting`: which attempt in a row this is (1, 2, ...). */
  attempt?: number;
}

export interface PresenceNotice {
  event: 'join' | 'leave';
  client: string;
  /** The token's `sub`, when the socket has one. */
  user?: string;
  name?: string;
}

/** One socket on a presence topic. */
export interface PresenceMember {
  client: string;
  user?: string;
  name?: string;
}

/** Who is on a presence topic. */
export interface PresenceList {
  members: PresenceMember[];
  clients: number;
  users: number;
  /** The list stopped at the node's --presence-max-members; the counts are whole. */
  truncated?: boolean;
}

export class HeraldError extends Error {
  constructor(code: string, message: string);
  /** On a subscription's error: the pattern refused. */
  pattern?: string;
  /** The node's error code (bad_topic, forbidden, unauthorized, rate_limited, ...) or the client's (queue_full, closed, connection_lost, timeout, not_connected, no_websocket, token). */
  code: string;
}

/** `state`, `connecting`, `open`, `reconnecting` and `closed` events. */
export interface HeraldStateEvent extends Event {
  readonly detail: StateDetail;
}

/** `error` events: an error frame for a request without a handler, or a handler that threw. */
export interface HeraldErrorEvent extends Event {
  readonly error: unknown;
}

export interface HeraldEventMap {
  state: HeraldStateEvent;
  connecting: HeraldStateEvent;
  open: HeraldStateEvent;
  reconnecting: HeraldStateEvent;
  closed: HeraldStateEvent;
  error: HeraldErrorEvent;
  /** The token was refreshed in band. */
  refreshed: Event;
  /** A subscription could not recover what it missed (see Subscription `gap`). */
  gap: GapEvent;
}

/** What `subscribe()` returns: call it to unsubscribe. */
export interface Subscription {
  (): void;
  /** Removes this handler (and the node's subscription with its last handler). */
  unsubscribe(): void;
  readonly pattern: string;
  readonly state: 'subscribing' | 'subscribed' | 'error' | 'unsubscribed';
  /** Resolves once the node has the subscription in effect; rejects with the node's refusal. */
  ready(): Promise<void>;
  /** The last history position seen on this subscription's topics (`--history` topics only). */
  readonly position: Position | null;
  /** After a (re)subscribe that asked for what was missed: whether the node replayed all of it. */
  readonly recovered: boolean | undefined;
  /** `subscribed` after every (re)subscribe; `error` when the node refuses the pattern; `gap` when messages were missed for good. */
  addEventListener(type: 'subscribed', listener: (ev: Event) => void): void;
  addEventListener(type: 'error', listener: (ev: HeraldErrorEvent) => void): void;
  addEventListener(type: 'gap', listener: (ev: GapEvent) => void): void;
  removeEventListener(type: 'subscribed' | 'error' | 'gap', listener: (ev: never) => void): void;
}

/** A place in the history: `seq` within `epoch`. */
export interface Position {
  seq: number;
  epoch: string;
}

/** Why a recovery could not give everything that was missed. */
export type GapReason = 'epoch_changed' | 'too_old' | 'too_many' | 'history_unavailable';

export interface GapEvent extends Event {
  detail: { pattern: string; reason: GapReason };
}

export interface SubscribeOptions {
  /** First deliver each matching topic's latest retained message. */
  last?: boolean;
}

export class Herald extends EventTarget {
  constructor(url: string, options?: HeraldOptions);
  readonly url: string;
  readonly state: HeraldState;
  /** Calls handler for every message on topics matching pattern; returns a Subscription (callable to unsubscribe). */
  subscribe(pattern: string, handler: (data: unknown, topic: string) => void, options?: SubscribeOptions): Subscription;
  /** Calls handler for join/leave notices on topics matching pattern; returns a Subscription. */
  presence(pattern: string, handler: (notice: PresenceNotice, topic: string) => void): Subscription;
  /** Who is on topic now, cluster-wide. */
  presence(topic: string): Promise<PresenceList>;
  /** How many sockets and users are on topic. */
  presenceStats(topic: string): Promise<{ clients: number; users: number }>;
  /** Publishes data (any JSON value); settles with the node's ack or error. */
  publish(topic: string, data: unknown): Promise<void>;
  /** Closes for good: no reconnect; publishes queued or awaiting their ack reject with code 'closed'. */
  close(): void;
  addEventListener<K extends keyof HeraldEventMap>(
    type: K,
    listener: (this: Herald, ev: HeraldEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof HeraldEventMap>(
    type: K,
    listener: (this: Herald, ev: HeraldEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/** The `exp` claim (Unix seconds) of a JWT, or undefined (no verification). */
export function tokenExpiry(token: string): number | undefined;
/** Whether a close code means "do not reconnect". */
export function isTerminal(code: number): boolean;
/** Whether a concrete topic falls under a pattern. */
export function matches(pattern: string, topic: string): boolean;

export default Herald;
