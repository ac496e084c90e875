// Headless Chromium pages drive the callgate demo through the real server, one scenario a run.
// Usage: node call.mjs DEMO_URL SCENARIO [SCREENSHOT.png]  -> one JSON line of results on stdout.
//   call     alice calls bob, media flows both ways, alice hangs up
//   offline  alice calls bob, who is not signed in
//   reload   alice, then bob, reload their page mid-call: the call resumes, media flows again
//   ringing  bob, then alice, reload their page while it rings: bob answers, media flows
//   restart  the server restarts mid-call: the pages reconnect by themselves. The run prints
//            {"step": "stop"} and then {"step": "start"} on stdout and waits for a line on stdin
//            after each, which the test sends once it has stopped or started the servers.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [demo, scenario, screenshot] = process.argv.slice(2);
const FLAGS = [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-quic",
  // fake camera and microphone, granted without a prompt
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
  // media over 127.0.0.1 only: loopback candidates allowed, real IPs instead of mDNS names
  "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
];

function log(message) {
  process.stderr.write(message + "\n");
}

const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

// Ask the test to do something to the servers, and wait until it says it is done.
async function step(name) {
  process.stdout.write(JSON.stringify({ step: name }) + "\n");
  const { done } = await stdin.next();
  if (done) throw new Error(`the test did not answer step ${name}`);
}

// What the page's WebSockets carried, as the browser saw it (not as the page says it did).
function recordFrames(page) {
  const frames = { sent: [], received: [] };
  page.on("websocket", (ws) => {
    const keep = (list) => ({ payload }) => {
      try {
        list.push({ at: Date.now(), ...JSON.parse(payload) });
      } catch {
        list.push({ at: Date.now(), event: "(not JSON)" });
      }
    };
    ws.on("framesent", keep(frames.sent));
    ws.on("framereceived", keep(frames.received));
  });
  return frames;
}

async function inbound(page) {
  return page.evaluate(async () => {
    const pc = window.callgate && window.callgate.pc;
    const total = { bytes: 0, frames: 0 };
    if (!pc) return total;
    (await pc.getStats()).forEach((report) => {
      if (report.type !== "inbound-rtp") return;
      total.bytes += report.bytesReceived || 0;
      if (report.kind === "video") total.frames += report.framesDecoded || 0;
    });
    return total;
  });
}

const text = (page, id) => page.evaluate((id) => {
  const element = document.getElementById(id);
  return element ? element.textContent : "";
}, id);

async function waitFor(page, predicate, what, ms = 30000, arg = null) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: ms, polling: 100 });
  } catch (error) {
    const shown = [await text(page, "status"), await text(page, "notice")].filter(Boolean).join(" | ");
    throw new Error(`${what}: not reached (${shown})`);
  }
}

async function until(check, what, ms = 30000) {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not reached`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const connected = () => Boolean(window.callgate.pc && window.callgate.pc.connectionState === "connected");

// Media flows on every page: inbound RTP bytes and decoded video frames grow, from now on. A
// counter that goes down belongs to a new peer connection: count from zero again.
async function mediaFlows(pages) {
  const from = {};
  const seen = {};
  for (const [user, page] of Object.entries(pages)) from[user] = await inbound(page);
  const grown = (user) => ({ bytes: seen[user].bytes - from[user].bytes, frames: seen[user].frames - from[user].frames });
  await until(async () => {
    for (const [user, page] of Object.entries(pages)) {
      seen[user] = await inbound(page);
      if (seen[user].bytes < from[user].bytes) from[user] = { bytes: 0, frames: 0 };
    }
    return Object.keys(pages).every((user) => grown(user).bytes > 20000 && grown(user).frames > 10);
  }, `media flows (${JSON.stringify({ from, seen })})`, 25000);
  return Object.fromEntries(Object.keys(pages).map((user) => [user, grown(user)]));
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: FLAGS });
const result = { scenario };
const pages = {};
const frames = {};

async function open(user, callee) {
  const context = await browser.newContext({ viewport: { width: 820, height: 720 } });
  const page = await context.newPage();
  page.on("console", (message) => log(`[${user}] ${message.text()}`));
  frames[user] = recordFrames(page);
  await page.goto(`${demo}?user=${user}&callee=${callee}&loopback=1`);
  await page.click("#signin-button");
  await waitFor(page, () => window.callgate.session !== null, `${user} signed in`);
  pages[user] = page;
  return page;
}

async function call() {
  const alice = await open("alice", "bob");
  const bob = await open("bob", "alice");
  await alice.click("#video-call");
  await waitFor(bob, () => !document.getElementById("incoming").hidden, "bob rings");
  await bob.click("#answer");
  for (const page of [alice, bob]) await waitFor(page, connected, "connected");
  return { alice, bob };
}

async function hangUp(alice, bob) {
  await alice.click("#hangup");
  await waitFor(bob, () => window.callgate.call === null, "bob sees the end");
  result.bob_status = await text(bob, "status");
}

const scenarios = {
  async call() {
    const { alice, bob } = await call();
    result.connected = true;
    const grown = await mediaFlows({ alice, bob });
    result.alice_bytes = grown.alice.bytes;
    result.bob_bytes = grown.bob.bytes;
    result.states = { alice: await text(alice, "call-state"), bob: await text(bob, "call-state") };
    if (screenshot) {
      // One picture of both pages side by side.
      const shots = [await alice.screenshot(), await bob.screenshot()].map((b) => b.toString("base64"));
      const board = await (await browser.newContext({ viewport: { width: 1660, height: 740 } })).newPage();
      await board.setContent(
        `<body style="margin:0;display:flex;gap:20px;background:#8a94a6;padding:10px">` +
          shots.map((s) => `<img style="width:820px;border-radius:6px" src="data:image/png;base64,${s}">`).join("") +
          `</body>`,
      );
      await board.screenshot({ path: screenshot });
    }
    await hangUp(alice, bob);
  },

  async offline() {
    const alice = await open("alice", "bob");
    const seen = frames.alice;
    await alice.click("#video-call");
    await until(() => seen.received.some((m) => m.event === "call-reject"), "the call is refused");
    const rejectedAt = seen.received.find((m) => m.event === "call-reject");
    const callId = rejectedAt.data.callId;
    // Every message the page sent has been answered (ack or error), so every error it causes
    // has arrived: the server answers in order.
    const answered = () => {
      const refs = new Set(seen.received.filter((m) => m.ref !== undefined).map((m) => m.ref));
      return seen.sent.every((m) => m.ref === undefined || refs.has(m.ref));
    };
    await until(answered, "every message answered");
    // The page's candidate gathering is over or stopped: nothing more can be in flight.
    await waitFor(alice, () => !window.callgate.pc, "the peer connection closed", 10000);
    await until(answered, "every message answered");
    result.status = await text(alice, "status");
    result.errors = seen.received.filter((m) => m.event === "error").map((m) => m.data.code);
    result.sent_after_reject = seen.sent
      .filter((m) => m.at >= rejectedAt.at && m.data && m.data.callId === callId)
      .map((m) => m.event);
    result.sent = seen.sent.map((m) => m.event);
    result.dialer_shown = await alice.evaluate(() => !document.getElementById("dialer").hidden);
    // Signing out is for good: the socket closes, and a reload does not sign in again.
    await alice.click("#signout");
    await alice.reload();
    result.after_sign_out = await alice.evaluate(() => ({
      signin: !document.getElementById("signin").hidden,
      kept: sessionStorage.length,
      ws: window.callgate.ws,
    }));
  },

  async reload() {
    const { alice, bob } = await call();
    result.media_before = await mediaFlows({ alice, bob });
    result.call_id = await alice.evaluate(() => window.callgate.call.id);
    await alice.reload();
    await waitFor(alice, () => Boolean(window.callgate && window.callgate.session), "alice signed in again");
    result.alice_session = await alice.evaluate(() => window.callgate.session);
    await waitFor(alice, () => Boolean(window.callgate.call), "alice back in the call", 10000);
    for (const page of [alice, bob]) await waitFor(page, connected, "connected again");
    result.call_id_after = await alice.evaluate(() => window.callgate.call.id);
    result.media_after = await mediaFlows({ alice, bob });
    result.bob_status_after = await text(bob, "status");
    // The callee's page reloads too: the session id it resumes with is the one of its last
    // sign-in, and the caller's side starts its new peer connection this time.
    await bob.reload();
    await waitFor(bob, () => Boolean(window.callgate && window.callgate.session && window.callgate.call), "bob back in the call");
    for (const page of [alice, bob]) await waitFor(page, connected, "connected after bob's reload");
    result.bob_resumed = await bob.evaluate(() => window.callgate.session.resumed);
    result.media_after_bob = await mediaFlows({ alice, bob });
    result.states = { alice: await text(alice, "call-state"), bob: await text(bob, "call-state") };
    await hangUp(alice, bob);
  },

  // A reload while it rings, on either side: bob rings again, alice's call goes on.
  async ringing() {
    const alice = await open("alice", "bob");
    const bob = await open("bob", "alice");
    await alice.click("#video-call");
    await waitFor(bob, () => !document.getElementById("incoming").hidden, "bob rings");
    await bob.reload();
    await waitFor(bob, () => Boolean(window.callgate.session) && !document.getElementById("incoming").hidden, "bob rings after his reload");
    await alice.reload();
    await waitFor(alice, () => Boolean(window.callgate.session && window.callgate.call), "alice calls after her reload");
    result.alice_while_ringing = await text(alice, "status");
    await bob.click("#answer");
    for (const page of [alice, bob]) await waitFor(page, connected, "connected");
    result.media = await mediaFlows({ alice, bob });
    await hangUp(alice, bob);
  },

  async restart() {
    const { alice, bob } = await call();
    const connections = {};
    for (const [user, page] of Object.entries(pages)) {
      connections[user] = await page.evaluate(() => window.callgate.session.connectionId);
    }
    await step("stop");
    result.down = {};
    for (const [user, page] of Object.entries(pages)) {
      await waitFor(page, () => window.callgate.call === null, `${user} sees the call end`, 15000);
      // At least one attempt to come back has failed while the server was away.
      await waitFor(page, () => {
        const shown = ["status", "notice"].map((id) => document.getElementById(id)?.textContent || "").join(" ");
        return /attempt [2-9]|attempt \d\d|could not reconnect/i.test(shown);
      }, `${user} retries`, 15000);
      result.down[user] = { status: await text(page, "status"), notice: await text(page, "notice") };
    }
    await step("start");
    result.up = {};
    for (const [user, page] of Object.entries(pages)) {
      await waitFor(page, (before) => {
        const app = window.callgate;
        return Boolean(app.session && app.session.connectionId !== before && app.ws.readyState === WebSocket.OPEN);
      }, `${user} reconnects`, 40000, connections[user]);
      result.up[user] = {
        status: await text(page, "status"),
        notice: await text(page, "notice"),
        connection: await text(page, "connection"),
      };
    }
    // And the pages work again: a new call rings.
    await alice.click("#video-call");
    await waitFor(bob, () => !document.getElementById("incoming").hidden, "bob rings after the restart");
    await hangUp(alice, bob);
  },
};

try {
  if (!scenarios[scenario]) throw new Error(`unknown scenario ${scenario}`);
  await scenarios[scenario]();
} catch (error) {
  result.error = String(error.message || error);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(0);
