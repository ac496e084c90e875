// The load generator of bench/run. One process, many WebSocket clients, loopback only.
//
//   node loadgen.mjs '{"target":"callgate","url":"ws://127.0.0.1:8765/ws","secret":"...",
//                      "workload":"W1","pairs":50,"window":32,"seconds":5}'
//
// Speaks callgate's native protocol (JWT in the Authorization header) or, for the reference,
// raw Socket.IO framing over WebSocket (what socket.io-client sends with transports:['websocket'],
// without its per-message overhead in the generator). Prints `{"phase":"start"}` when the measured
// part begins, `{"phase":"end"}` when it ends (the runner samples the server's CPU there), then one
// JSON line of results. Every loop is bounded in count and time.
import { createHmac, randomUUID } from "node:crypto";
import WebSocket from "ws";

const config = JSON.parse(process.argv[2]);
const native = config.target === "callgate";
const emitLine = (value) => process.stdout.write(JSON.stringify(value) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const CANDIDATE = {
  candidate: "candidate:842163049 1 udp 1677729535 198.51.100.7 46154 typ srflx raddr 10.0.0.7 rport 46154 generation 0 ufrag EEtu network-id 3",
  sdpMid: "0",
  sdpMLineIndex: 0,
  usernameFragment: "EEtu",
};
const SDP = "v=0\r\n" + "a=candidate-and-codec-line-padding-to-make-a-realistic-offer\r\n".repeat(52);

function b64url(value) {
  return Buffer.from(value).toString("base64url");
}

function token(user) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const now = Math.floor(Date.now() / 1000);
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + 3600 }));
  const signature = createHmac("sha256", config.secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

// One client: connect, sign in, then `send(event, data)` and an `onEvent(event, data)` hook.
class Client {
  constructor(user, localAddress, url = config.url) {
    this.user = user;
    this.localAddress = localAddress;
    this.url = url;
    this.onEvent = () => {};
  }

  open() {
    return new Promise((resolve, reject) => {
      const options = { perMessageDeflate: false, localAddress: this.localAddress };
      let url = this.url;
      if (native) options.headers = { Authorization: `Bearer ${token(this.user)}` };
      else url = this.url + "/socket.io/?EIO=4&transport=websocket";
      const ws = new WebSocket(url, options);
      this.ws = ws;
      ws.on("error", reject);
      ws.on("close", () => reject(new Error(`${this.user} closed before signing in`)));
      ws.on("message", (raw) => {
        const text = raw.toString();
        if (native) {
          const message = JSON.parse(text);
          if (message.event === "session") return resolve(this);
          this.onEvent(message.event, message.data);
          return;
        }
        // Engine.IO / Socket.IO framing
        if (text === "2") return ws.send("3");
        if (text[0] === "0") return ws.send("40");
        if (text.startsWith("40")) {
          ws.send(`42${JSON.stringify(["user-connected", this.user])}`);
          return resolve(this);
        }
        if (text.startsWith("42")) {
          const [event, data] = JSON.parse(text.slice(2));
          this.onEvent(event, data);
        }
      });
    });
  }

  send(event, data) {
    this.ws.send(native ? JSON.stringify({ event, data }) : `42${JSON.stringify([event, data])}`);
  }

  close() {
    this.ws.terminate();
  }
}

// Spread clients over 127.0.x.y source addresses, 10,000 each, starting at a different place in
// every run: 50,000 connections, and storms right after one another (whose closed sockets linger
// in TIME_WAIT), never run out of ephemeral ports.
const SOURCE_BASE = 2 + Math.floor(Math.random() * 200);
function sourceAddress(index) {
  const n = SOURCE_BASE + Math.floor(index / 10000);
  return `127.0.${n >> 8}.${n & 255 || 1}`;
}

// Cluster runs (bench/run --cluster) name every node in `urls`: idle clients go round the first
// `idle_nodes` of them, and the traffic's pairs round the first `traffic_nodes`, pair i's caller on
// node i and its callee on the next one, so that every callee is on another node than its caller
// (with one node, both are on it). Without `urls` everything goes to `url`.
const URLS = config.urls || [config.url];
const IDLE_URLS = URLS.slice(0, config.idle_nodes || URLS.length);
const TRAFFIC_URLS = URLS.slice(0, config.traffic_nodes || URLS.length);
const trafficUrl = (index) => TRAFFIC_URLS[index % TRAFFIC_URLS.length];

async function openAll(users, concurrency = 200, urlOf = () => config.url) {
  const clients = new Array(users.length);
  let next = 0;
  async function worker() {
    while (next < users.length) {
      const index = next++;
      clients[index] = await new Client(users[index], sourceAddress(index), urlOf(index)).open();
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, users.length) }, worker));
  return clients;
}

// Pairs in a call (callgate needs one for ice-candidate to be allowed; the reference does not care).
async function pairs(count, prefix) {
  const callers = await openAll(Array.from({ length: count }, (_, i) => `${prefix}a${i}`), 200, trafficUrl);
  const callees = await openAll(
    Array.from({ length: count }, (_, i) => `${prefix}b${i}`), 200, (i) => trafficUrl(i + 1));
  const ids = [];
  await Promise.all(callers.map((caller, i) => new Promise((resolve) => {
    const callee = callees[i];
    const id = randomUUID();
    ids.push(id);
    caller.callId = callee.callId = id;
    callee.onEvent = (event, data) => {
      if (event === "call-request") callee.send("call-answer", { callId: data.id, to: caller.user, answer: { type: "answer", sdp: "v=0" } });
    };
    caller.onEvent = (event) => { if (event === "call-answer") resolve(); };
    caller.send("call-request", { id, from: caller.user, to: callee.user, type: "video", offer: { type: "offer", sdp: "v=0" }, timestamp: Date.now() });
  })));
  return callers.map((caller, i) => [caller, callees[i]]);
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function w1() {
  // Saturated forwarding: each sender keeps `window` messages in flight to its peer.
  const all = await pairs(config.pairs, "w1");
  let forwarded = 0;
  let running = true;
  const payload = (caller, callee) => ({ candidate: CANDIDATE, callId: caller.callId, to: callee.user });
  for (const [caller, callee] of all) {
    callee.onEvent = (event) => {
      if (event !== "ice-candidate") return;
      forwarded++;
      if (running) caller.send("ice-candidate", payload(caller, callee));
    };
  }
  emitLine({ phase: "start" });
  const started = performance.now();
  for (const [caller, callee] of all) for (let i = 0; i < config.window; i++) caller.send("ice-candidate", payload(caller, callee));
  await sleep(config.seconds * 1000);
  running = false;
  const elapsed = (performance.now() - started) / 1000;
  const counted = forwarded;
  emitLine({ phase: "end" });
  await sleep(200);
  all.flat().forEach((c) => c.close());
  return { messages: counted, seconds: elapsed, rate: counted / elapsed };
}

async function w2() {
  // Sparse forwarding at a fixed total rate; one-way latency from a timestamp in the message.
  const all = await pairs(config.pairs, "w2");
  const latencies = [];
  for (const [, callee] of all) {
    callee.onEvent = (event, data) => {
      if (event === "ice-candidate") latencies.push(performance.now() - data.sent);
    };
  }
  const total = Math.round(config.rate * config.seconds);
  emitLine({ phase: "start" });
  const started = performance.now();
  let sent = 0;
  while (sent < total && performance.now() - started < config.seconds * 1000 + 2000) {
    // Paced by the clock, not by counting ticks: a timer fires late (a 5 ms tick took about
    // 6.6 ms at 10,000 msg/s), and counting ticks offered only three quarters of the rate.
    // Ticks of about a millisecond keep each burst small (10 messages at 10,000 msg/s).
    const due = Math.min(total, Math.floor((config.rate * (performance.now() - started)) / 1000));
    while (sent < due) {
      const [caller, callee] = all[sent % all.length];
      caller.send("ice-candidate", { candidate: CANDIDATE, callId: caller.callId, to: callee.user, sent: performance.now() });
      sent++;
    }
    await sleep(1);
  }
  if (config.drain_s === undefined) await sleep(500);
  else {
    // Until every message sent has arrived (a queue behind a busy server is part of its cost),
    // for at most drain_s.
    const until = performance.now() + config.drain_s * 1000;
    while (latencies.length < sent && performance.now() < until) await sleep(5);
  }
  emitLine({ phase: "end" });
  latencies.sort((a, b) => a - b);
  all.flat().forEach((c) => c.close());
  return {
    messages: latencies.length, sent, seconds: (performance.now() - started) / 1000,
    p50_ms: percentile(latencies, 50), p99_ms: percentile(latencies, 99), max_ms: latencies.at(-1) ?? null,
  };
}

async function w5() {
  // The scaling curve: W2's sparse forwarding while `idle` other clients are connected.
  const idle = await openAll(
    Array.from({ length: config.idle }, (_, i) => `w5idle${i}`), 500, (i) => IDLE_URLS[i % IDLE_URLS.length]);
  // A cluster node may still be taking in the other nodes' sign-ins: settle_ms lets it finish.
  await sleep(config.settle_ms || 0);
  emitLine({ phase: "idle", clients: idle.length }); // the runner reads memory now
  const result = await w2();
  idle.forEach((c) => c.close());
  return { idle: idle.length, ...result };
}

async function w3() {
  // Capacity and reconnect storm: `clients` connect and sign in at once, then stay idle.
  const users = Array.from({ length: config.clients }, (_, i) => `w3u${i}`);
  emitLine({ phase: "start" });
  const started = performance.now();
  const clients = await openAll(users, config.concurrency || 500);
  const elapsed = (performance.now() - started) / 1000;
  emitLine({ phase: "end" });
  emitLine({ phase: "idle", clients: clients.length }); // the runner reads memory now
  await sleep(config.idle_ms || 1500);
  clients.forEach((c) => c.close());
  return { connections: clients.length, seconds: elapsed, rate: clients.length / elapsed };
}

async function w4() {
  // Call setup: call-request with a 3 KB SDP to call-answer received, one call at a time per pair.
  const callers = await openAll(Array.from({ length: config.pairs }, (_, i) => `w4a${i}`));
  const callees = await openAll(Array.from({ length: config.pairs }, (_, i) => `w4b${i}`));
  const times = [];
  emitLine({ phase: "start" });
  await Promise.all(callers.map(async (caller, i) => {
    const callee = callees[i];
    callee.onEvent = (event, data) => {
      if (event === "call-request") callee.send("call-answer", { callId: data.id, to: caller.user, answer: { type: "answer", sdp: SDP } });
    };
    for (let n = 0; n < config.calls; n++) {
      const id = randomUUID();
      const began = performance.now();
      await new Promise((resolve) => {
        caller.onEvent = (event, data) => { if (event === "call-answer" && data.callId === id) resolve(); };
        caller.send("call-request", { id, from: caller.user, to: callee.user, type: "video", offer: { type: "offer", sdp: SDP }, timestamp: Date.now() });
      });
      times.push(performance.now() - began);
      caller.send("call-end", { callId: id, to: callee.user });
      await sleep(2);
    }
  }));
  emitLine({ phase: "end" });
  times.sort((a, b) => a - b);
  [...callers, ...callees].forEach((c) => c.close());
  return { calls: times.length, p50_ms: percentile(times, 50), p99_ms: percentile(times, 99) };
}

const workloads = { W1: w1, W2: w2, W3: w3, W4: w4, W5: w5 };
const guard = setTimeout(() => { emitLine({ error: "timed out" }); process.exit(2); }, (config.limit_s || 120) * 1000);
try {
  const result = await workloads[config.workload]();
  emitLine({ result });
} catch (error) {
  emitLine({ error: String(error && error.message || error) });
}
clearTimeout(guard);
process.exit(0);
