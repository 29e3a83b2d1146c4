// Starts real `herald` processes for the client tests and stops them by PID.
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const HERALD_BIN = process.env.HERALD_BIN || path.join(root, 'target', 'ci', 'herald');

export class Node {
  static async start(args = [], port = 0) {
    const n = new Node();
    n.args = args;
    const k = args.indexOf('--api-key');
    n.apiKey = k >= 0 ? args[k + 1] : undefined;
    await n._spawn(port);
    return n;
  }

  async _spawn(port) {
    this.proc = spawn(HERALD_BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--log-level', 'warn', ...this.args], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const rl = createInterface({ input: this.proc.stdout });
    const [line] = await once(rl, 'line');
    rl.close();
    const m = /herald listening on (.*):(\d+)$/.exec(line);
    if (!m) throw new Error(`unexpected first line ${line}`);
    this.port = Number(m[2]);
    this.url = `ws://127.0.0.1:${this.port}/ws`;
    this.http = `http://127.0.0.1:${this.port}`;
  }

  async kill() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = once(this.proc, 'exit');
    this.proc.kill('SIGKILL');
    await exited;
  }

  /** Starts it again on the same port. */
  async restart() {
    await this.kill();
    for (let i = 0; ; i++) {
      try {
        await this._spawn(this.port);
        return;
      } catch (e) {
        if (i > 50) throw e;
        await sleep(100);
      }
    }
  }

  stop() {
    this.proc.kill('SIGSTOP');
  }

  cont() {
    this.proc.kill('SIGCONT');
  }

  async publish(topic, data) {
    const headers = this.apiKey ? { authorization: `Bearer ${this.apiKey}` } : {};
    const r = await fetch(`${this.http}/v1/publish`, { method: 'POST', headers, body: JSON.stringify({ topic, data }) });
    if (r.status !== 200) throw new Error(`publish: ${r.status} ${await r.text()}`);
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves once `predicate()` is true (polling), or rejects after `ms`. */
export async function until(what, predicate, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await sleep(20);
  }
}

/** Resolves with the next event of `type`. */
export function next(target, type) {
  return new Promise((resolve) => target.addEventListener(type, (e) => resolve(e), { once: true }));
}

export const HMAC_KEY = path.join(root, 'broker', 'tests', 'keys', 'hmac.key');

/** A development token from `herald token` (HS256, the tests' key). */
export function mintToken({ sub, subscribe = [], publish = [], ttl = '1h' }) {
  const args = ['token', '--key-file', HMAC_KEY, '--ttl', ttl];
  if (sub) args.push('--sub', sub);
  for (const p of subscribe) args.push('--subscribe', p);
  for (const p of publish) args.push('--publish', p);
  return execFileSync(HERALD_BIN, args, { encoding: 'utf8' }).trim();
}
